"""What the service loads once and answers from: the embedding model, the gallery index with its
store lookups, and the prediction model; and the hot reload of the gallery when `ecgplat index
update`, `index compact`, `watch` or `forget` changes it.

A `Gallery` is an immutable snapshot (index, record lookup, the change key it was read at); a
request takes the current one and keeps it for its whole answer, and a reload swaps in a new one.
`ServiceState.poll` compares the change key (the index file and its delta segments, the store's
commit point and tombstone table, the feature set's lineage) with the snapshot's and reloads
when it moved. A store at a URL (a published store, `ecgplat publish`) is read where it lies;
its commit points are objects, compared by their bytes (a republish moves them).

A reloaded index must still be of the checkpoint the service embeds with (and of its lead set,
precision and normalisation): otherwise it is refused, and so is an index that
`ecgplat forget` made stale; a refused index is not served at all (the old snapshot may hold
forgotten records), queries answer 503 with the reason until a good index appears.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from ecgplat.cli.serve.settings import ServeSettings
from ecgplat.store import open_store
from ecgplat.store.schema import COMMIT_FILE, FORGOTTEN_FILE, is_url
from retrieval.features import FeatureSet, UrlFolder
from retrieval.index import GalleryIndex, index_file
from retrieval.index.file import delta_files, stat_key
from retrieval.lineage import Lineage, LineageError
from retrieval.model import LoadedModel
from retrieval.query import RecordLookup

if TYPE_CHECKING:
    import torch

log = logging.getLogger("ecgplat.serve")
LOAD_TRIES = 3  # a writer may swap files between our reads of main file and deltas: retry


@dataclass(frozen=True)
class Gallery:
    """One consistent view of the index and the store records it names."""

    index: GalleryIndex
    lookup: RecordLookup
    key: tuple
    loaded_at: float


def _point_key(path: Path | UrlFolder) -> object:
    """What changes when a commit point is replaced: a file's identity (inode, size, mtime), an
    object's bytes."""
    if not isinstance(path, UrlFolder):
        return stat_key(path)
    try:
        return hashlib.sha256(path.read_text().encode()).hexdigest()
    except FileNotFoundError:
        return None


def change_key(index_path: Path, store: Path | str, features: str | None) -> tuple:
    """What moves when the index, its deltas, the store's commit or tombstones, or the feature
    set change."""
    parts: list = [stat_key(index_path)]
    parts += [(p.name, stat_key(p)) for p in delta_files(index_path)]
    root = UrlFolder(str(store)) if is_url(store) else Path(store)
    parts += [_point_key(root / COMMIT_FILE), _point_key(root / FORGOTTEN_FILE)]
    if features:
        parts.append(_point_key(FeatureSet.named(store, features).path / "zarr.json"))
    return tuple(parts)


def same_store(a: Path | str, b: Path | str) -> bool:
    ua = open_store(a).attrs.get("store_uuid")
    ub = open_store(b).attrs.get("store_uuid")
    if ua and ub:
        return bool(ua == ub)
    if is_url(a) or is_url(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


class ServiceState:
    """The loaded models and the current gallery snapshot of one service process."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        # a folder as a Path, a URL as a str; FileNotFoundError / ValueError naming it
        self.store = open_store(settings.store).path
        self.index_path = None if settings.index is None else index_file(settings.index)
        self.model: LoadedModel | None = None
        self.predictor = None
        self.gallery: Gallery | None = None
        self.error: str | None = None
        self.reloads = 0
        self._reference: dict = {}
        self._lock = threading.Lock()
        self._secret: bytes | None = None
        if settings.index is not None:
            self._load_index_model()
        elif settings.checkpoint is not None:
            self.model = LoadedModel.load(settings.checkpoint)
        if self.model is not None:
            cast("torch.nn.Module", self.model.encoder).eval()  # once: concurrent runs then
            # never toggle its mode (embed_batches puts back the mode it found)
        self.explainer = None
        if settings.checkpoint is not None:
            self.predictor = load_predictor(settings.checkpoint, settings.device)
            self.explainer = load_explainer(settings.checkpoint)

    # ---- loading ------------------------------------------------------------------------
    def _load_index_model(self) -> None:
        """The first gallery and the model its embeddings came from; errors propagate."""
        path = cast(Path, self.index_path)
        index = GalleryIndex.load(path)
        lineage = index.lineage
        where = lineage.get("store")
        if where and (is_url(where) or Path(where).is_dir()) and not same_store(where, self.store):
            raise ValueError(f"{path}: the index was built from another store than {self.store}")
        if not where or not lineage.get("features"):
            raise LineageError(f"{path}: the index does not name its store and feature set")
        checkpoint = lineage.get("checkpoint")
        if not checkpoint or not Path(checkpoint).is_file():
            raise LineageError(f"{path}: the index's checkpoint {checkpoint} is missing")
        self.model = LoadedModel.load(checkpoint)
        self._reference = dict(lineage, checkpoint_sha256=self.model.sha256)
        self._check(lineage, path)
        self.gallery = self._snapshot(index, path)

    def _check(self, lineage: dict, path: Path) -> None:
        """LineageError when an index's embeddings are not of the service's model."""
        Lineage(lineage).require_same(
            self._reference,
            Lineage.MODEL_KEYS,
            f"{path}: the service embeds with",
            "restart the service with the index's checkpoint, or rebuild the index",
        )

    def _snapshot(self, index: GalleryIndex, path: Path) -> Gallery:
        lineage = index.lineage
        key = change_key(path, self.store, lineage.get("features"))
        lookup = RecordLookup(self.store, lineage["features"])
        return Gallery(index, lookup, key, time.time())

    def _load_gallery(self) -> Gallery:
        path = cast(Path, self.index_path)
        for attempt in range(LOAD_TRIES):
            try:
                key = change_key(path, self.store, (self._reference or {}).get("features"))
                index = GalleryIndex.load(path)
                self._check(index.lineage, path)
                gallery = self._snapshot(index, path)
                if gallery.key == key:  # nothing moved while it was read
                    return gallery
            except (LineageError, FileNotFoundError):
                raise
            except ValueError:
                if attempt == LOAD_TRIES - 1:
                    raise
            time.sleep(0.05)
        return gallery

    def poll(self) -> str | None:
        """Reload the gallery when its files changed: "reloaded", "refused" or None (no
        change). Never raises: a failure is kept in `error` and the gallery withdrawn."""
        if self.index_path is None:
            return None
        with self._lock:
            path = self.index_path
            try:
                key = change_key(path, self.store, self._reference.get("features"))
            except OSError:
                key = None
            current = self.gallery
            if current is not None and key == current.key:
                return None
            if current is None and self.error is not None and key == self._failed_key:
                return None
            try:
                self.gallery, self.error = self._load_gallery(), None
                self.reloads += 1
                log.info("index reloaded: %d rows", len(self.gallery.index))
                return "reloaded"
            except Exception as e:  # noqa: BLE001 - any unreadable index is refused, not served
                from ecgplat.cli.apps import describe_error

                self.gallery, self.error = None, describe_error(e)[0]
                self._failed_key = key
                log.warning("index refused: %s", self.error)
                return "refused"

    _failed_key: tuple | None = None

    # ---- helpers for the routes -----------------------------------------------------------
    def patient_key(self, raw_id: str | None) -> str | None:
        """The store's pseudonym of an uploaded record's raw patient id (None without one, or
        when the store's secret cannot be read): for the same-patient flags only."""
        if not raw_id or not str(raw_id).strip():
            return None
        from ecgplat.privacy import pseudonymise

        if self._secret is None:
            try:  # a published store holds no secret: no same-patient flags for uploads
                local = not isinstance(self.store, str)
                self._secret = (Path(self.store) / "secret.key").read_bytes() if local else b""
            except OSError:
                self._secret = b""
        return pseudonymise(str(raw_id), self._secret) if self._secret else None


def load_predictor(checkpoint: Path, device: str):
    """The prediction model of `ecgplat predict` (training.predict), loaded once."""
    from training.predict import load_predictor as load

    return load(checkpoint, device=device)


def load_explainer(checkpoint: Path):
    """The checkpoint's head graph for attributions (training.explain, Integrated Gradients),
    or None where that library is not installed (the page then shows no overlay)."""
    try:
        import training.explain  # noqa: F401 - its presence is what enables /explain
        from training.models.deployable import load_deployable
    except ImportError:
        return None
    return load_deployable(checkpoint)
