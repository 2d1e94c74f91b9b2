"""The feature-set format (`STORE/features/<name>/`, docs/formats.md "Feature sets") and its read
API: the `FeatureSet` handle of a set by store and name, and its committed rows, read lazily.

A set holds segment- and record-level embeddings (`segment/`, `record/`: `embedding`,
`record_index`, and at segment level `segment_number`) and its lineage in the group's attributes;
the lineage's counts (`n_segments`, `n_record_rows`) say how many rows are committed. Readers see
only complete sets, their committed rows, and never the rows of forgotten records.

A set may also lie outside its store, in a local features folder of its own (`ecgplat embed
--features-out DIR`, for a read-only store at a URL): it is named `DIR/NAME` wherever a set's
name is taken, and is bound to its store by the lineage's `store_uuid` (checked when it is read).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import cast

import numpy as np

from ecgplat.leads import LEADS, parse_leads
from ecgplat.store import FEATURES_DIR as FEATURES
from ecgplat.store import is_url, read_forgotten, store_file

SCHEMA = "ecgplat-features/1"
LEVELS = ("segment", "record")
BUILD_PREFIX = ".build-"


class FeatureError(ValueError):
    """A feature set that cannot be written or read; the message names the store and the reason."""


def lead_names(leads) -> str:
    """Canonical comma-joined lead names of a lead spec ("12", "I,II,V2", ...)."""
    return ",".join(LEADS[i] for i in parse_leads(leads))


class UrlFolder(str):
    """A folder of a store read by URL (a published store, `ecgplat publish`): the read-only
    part of `Path` that finding and opening a feature set uses, through fsspec."""

    def __truediv__(self, part: str) -> UrlFolder:
        return UrlFolder(f"{self.rstrip('/')}/{part}")

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    def _fs(self):
        import fsspec

        return fsspec.core.url_to_fs(str(self))

    def is_file(self) -> bool:
        fs, key = self._fs()
        return bool(fs.isfile(key))

    def is_dir(self) -> bool:
        fs, key = self._fs()
        return bool(fs.isdir(key))

    def iterdir(self) -> list[UrlFolder]:
        fs, key = self._fs()
        return [self / entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(key, detail=False)]

    def read_text(self) -> str:
        fs, key = self._fs()
        return fs.cat_file(key).decode()


def dir_lineage(path: Path) -> dict | None:
    """The lineage in the attributes of the feature-set directory `path` (complete or not)."""
    meta = path / "zarr.json"
    try:
        text = meta.read_text() if meta.is_file() else None
    except FileNotFoundError:  # renamed away since it was looked at (a publish)
        return None
    return None if text is None else json.loads(text).get("attributes", {}).get("lineage")


@dataclass(frozen=True)
class FeatureSet:
    """The feature set `name` of the store at `store_path`: where it lies (and is built), its
    lineage and its rows. `folder`: the features folder holding it when it lies outside the
    store (`embed --features-out`); readers name such a set `DIR/NAME` (`named`). FeatureError
    for a name that cannot be a set's."""

    store_path: str | os.PathLike  # as given: messages name it so
    name: str
    folder: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        name = self.name
        if not name or name.startswith(".") or "/" in name or name in LEVELS:
            raise FeatureError(f"{self.store_path}: bad feature set name {name!r}")

    @classmethod
    def named(cls, store_path: str | os.PathLike, spec: str) -> FeatureSet:
        """The set a reader names `spec`: `NAME` (in the store) or `DIR/NAME` (outside it)."""
        if "/" not in str(spec):
            return cls(store_path, spec)
        parent, _, name = str(spec).rstrip("/").rpartition("/")
        return cls(store_path, name, parent or "/")

    @property
    def root(self) -> Path:
        """The `features/` folder holding every set: the store's, or `folder`."""
        if self.folder is not None:
            return Path(self.folder)
        if is_url(self.store_path):  # read-only, a Path to the readers below
            return cast(Path, UrlFolder(str(self.store_path)) / FEATURES)
        return Path(self.store_path) / FEATURES

    @property
    def path(self) -> Path:
        """`features/<name>`: the published set."""
        return self.root / self.name

    @property
    def build_path(self) -> Path:
        """`features/.build-<name>`: a new set (or an overwrite) while it is written."""
        return self.root / f"{BUILD_PREFIX}{self.name}"

    def published(self) -> tuple[Path, dict] | None:
        """(folder, lineage) of the complete set: `features/<name>`, else the complete build of
        an overwrite caught between its two renames (the old set moved aside, the new one not
        yet in place: killed there, the next embed finishes the move), else None. The name is
        looked at again last, for a move that ended while the build was being looked at."""
        for path in (self.path, self.build_path, self.path):
            lineage = dir_lineage(path)
            if lineage and lineage.get("complete"):
                self._check_bound(path, lineage)
                return path, lineage
        return None

    def _check_bound(self, path: Path, lineage: dict) -> None:
        """FeatureError when a set outside the store was embedded from another store."""
        if self.folder is None:
            return
        raw = store_file(self.store_path, "zarr.json")
        attrs = json.loads(raw).get("attributes", {}) if raw is not None else {}
        if raw is not None and lineage.get("store_uuid") != attrs.get("store_uuid"):
            raise FeatureError(
                f"{path}: feature set embedded from another store (store_uuid "
                f"{lineage.get('store_uuid')}), not from {self.store_path}"
            )

    def lineage(self) -> dict | None:
        """The lineage of the complete set, or None when there is none under this name."""
        found = self.published()
        return found[1] if found else None

    def group(self, level: str, folder: Path | None = None):
        """The zarr group of one level (segment | record) of the published set (or of the set
        in `folder`), read-only."""
        import zarr

        if folder is None:
            found = self.published()
            folder = found[0] if found else self.path
        return zarr.open_group(str(folder / level), mode="r")

    def open(self, level: str = "record") -> StoredFeatures:
        """The committed rows at `level` (segment | record), less those of forgotten records,
        with the embeddings left on disk until read."""
        _check_level(level)
        found = self.published()
        if found is None:
            where = self.store_path if self.folder is None else self.root
            have = ", ".join(list_features(self.store_path, self.folder)) or "none"
            raise FeatureError(
                f"{where}: no feature set {self.name!r} (have: {have}); run `ecgplat embed` first"
            )
        folder, lineage = found
        group = self.group(level, folder)
        n = lineage.get("n_segments" if level == "segment" else "n_record_rows")
        n = int(group["record_index"].shape[0]) if n is None else int(n)  # sets of before appends
        record_index = np.asarray(group["record_index"][:n], dtype=np.int64)
        forgotten = read_forgotten(self.store_path)["records"]
        live = ~np.isin(record_index, forgotten) if len(forgotten) else None
        keep = None if live is None or live.all() else np.flatnonzero(live)  # None: every row
        if keep is not None:
            record_index = record_index[keep]
        return StoredFeatures(group, n, keep, record_index, lineage, level)


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise FeatureError(f"unknown feature level {level!r}; choose segment or record")


def list_features(
    store_path: str | os.PathLike, folder: str | os.PathLike | None = None
) -> list[str]:
    """The names of the store's complete feature sets (those in `folder`, outside it), sorted."""
    root = FeatureSet(store_path, "x", folder).root
    if not root.is_dir():
        return []
    # a `.build-<name>` folder may hold the set while an overwrite moves it (`published`)
    names = {p.name.removeprefix(BUILD_PREFIX) for p in root.iterdir()}
    return sorted(
        name
        for name in names
        if name and not name.startswith(".") and name not in LEVELS
        if _bound_lineage(FeatureSet(store_path, name, folder))
    )


def _bound_lineage(fs: FeatureSet) -> dict | None:
    """`fs.lineage()`, None for a set outside the store that was embedded from another store."""
    try:
        return fs.lineage()
    except FeatureError:
        return None


@dataclass
class Features:
    embeddings: np.ndarray  # float32 (n, D) unit rows
    record_index: np.ndarray  # int64 (n,)
    segment_number: np.ndarray | None  # int32 (n,) for segment level
    lineage: dict


class FeatureRows:
    """Some rows of a stored feature set's embedding array, read from disk only when sliced:
    `rows[a:b]` or `rows[positions]` is a float32 array, so a caller can walk a set larger than
    memory part by part. `rows=None` stands for the first `n` rows, without a position array."""

    def __init__(self, array, rows: np.ndarray | None, n: int | None = None):
        self._array = array
        self.rows = None if rows is None else np.asarray(rows)
        n = len(self.rows) if self.rows is not None else int(n if n is not None else len(array))
        self.shape = (n, int(array.shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def _positions(self, key) -> np.ndarray:
        if self.rows is not None:
            return np.atleast_1d(self.rows[key])
        if isinstance(key, slice):
            return np.arange(*key.indices(self.shape[0]))
        return np.atleast_1d(np.arange(self.shape[0])[key])

    def __getitem__(self, key) -> np.ndarray:
        if self.rows is None and isinstance(key, slice) and key.step in (None, 1):
            lo, hi, _ = key.indices(self.shape[0])  # a run of the first rows: one slice read
            return np.asarray(self._array[lo : max(lo, hi)], dtype=np.float32)
        r = self._positions(key)
        if len(r) > 1 and (np.diff(r) <= 0).any():  # out of order or repeated: read each once
            distinct, back = np.unique(r, return_inverse=True)
            return self._read(distinct)[back]
        return self._read(r)

    def _read(self, r: np.ndarray) -> np.ndarray:
        if not len(r):
            return np.zeros((0, self.shape[1]), dtype=np.float32)
        if r[-1] - r[0] + 1 == len(r):  # a contiguous run: one slice read
            part = self._array[int(r[0]) : int(r[-1]) + 1]
        else:  # zarr reads only the chunks holding these rows
            part = self._array.get_orthogonal_selection((r, slice(None)))
        return np.asarray(part, dtype=np.float32)

    def take(self, positions) -> FeatureRows:
        """The rows at `positions` (ascending) of these, still unread."""
        rows = np.asarray(positions) if self.rows is None else self.rows[positions]
        return FeatureRows(self._array, rows)


class StoredFeatures:
    """A feature set opened for reading, less the rows of forgotten records: its lineage, the
    record of each row, and its embeddings (`rows`) and segment numbers, read when asked."""

    def __init__(self, group, n: int, keep: np.ndarray | None, record_index, lineage, level):
        self._group, self._n, self._keep, self.level = group, n, keep, level
        self.rows = FeatureRows(group["embedding"], keep, n)
        self.record_index = record_index  # int64 (rows,)
        self.lineage = lineage

    @cached_property
    def segment_number(self) -> np.ndarray | None:
        """int32 (rows,) window number of each row in its record (segment level only)."""
        if self.level != "segment":
            return None
        values = np.asarray(self._group["segment_number"][: self._n])
        return values if self._keep is None else values[self._keep]

    def load(self) -> Features:
        return Features(self.rows[:], self.record_index, self.segment_number, self.lineage)


def open_features(
    store_path: str | os.PathLike, name: str, level: str = "record"
) -> StoredFeatures:
    """The committed rows of a feature set at `level` (segment | record), less those of
    forgotten records, with the embeddings left on disk until read (`FeatureSet.open`)."""
    _check_level(level)  # a bad level is reported before a bad name
    return FeatureSet.named(store_path, name).open(level)


def load_features(store_path: str | os.PathLike, name: str, level: str = "record") -> Features:
    """The committed rows of a feature set at `level` (segment | record), read into memory."""
    return open_features(store_path, name, level).load()
