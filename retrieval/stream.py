"""Append path for streaming ingestion: bring a feature set and an index up to the store's
committed records, with the model loaded once for the life of the process.

`embed_missing(store, name, embedder)` and `index_missing(index, store, name)` are the two calls
`ecgplat watch` makes after each commit. They are the incremental `embed_store` (only the
segments the set lacks are embedded, in its fixed batches, so the set stays bit-equal to a
full embed) and `update_from_features` (`ecgplat index update`) over the record-level index of
every record (`--split all`), which is built when its file is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

from retrieval.embed import embed_store
from retrieval.features import FeatureError, FeatureSet, lead_names
from retrieval.index import GalleryIndex, index_file, index_from_features, index_lock, update_index
from retrieval.lineage import Lineage
from retrieval.model import LoadedModel


class Embedder:
    """A checkpoint's encoder loaded once, with the leads, device and precision to embed with."""

    def __init__(self, checkpoint, leads="12", device: str = "auto", precision: str = "auto"):
        lead_names(leads)  # ValueError naming a bad lead, before the model is loaded
        self.model = LoadedModel.load(checkpoint)
        self.leads, self.device, self.precision = leads, device, precision

    def lineage(self) -> dict:
        """The checkpoint and leads of the embeddings it makes (as a lineage records them)."""
        return {"checkpoint_sha256": self.model.sha256, "leads": lead_names(self.leads)}


def check_targets(
    store_path: str | os.PathLike,
    name: str,
    embedder: Embedder,
    index_path: str | Path | None = None,
) -> None:
    """What `ecgplat watch` checks before it reads any record: FeatureError for a name that
    cannot be a feature set's or a set of another checkpoint's or lead set's embeddings;
    LineageError / ValueError for an existing index that `index_missing` could not grow with
    them (another checkpoint or leads, not record-level over all records, not an index)."""
    fs = FeatureSet(store_path, name)
    want = embedder.lineage()
    old = fs.lineage()
    if old is not None and any(old.get(key) != value for key, value in want.items()):
        raise FeatureError(
            f"{store_path}: feature set {name!r} holds embeddings of checkpoint "
            f"{str(old.get('checkpoint_sha256'))[:12]} with leads {old.get('leads')}; "
            "use another --embed name"
        )
    if index_path is not None and index_file(index_path).is_file():
        gallery = GalleryIndex.load(index_path, main_vectors=False, main_ids=False)
        _check_all_records(gallery, index_path)
        Lineage(gallery.lineage).require_same(
            want, Lineage.QUERY_KEYS, "watch embeds with", "use another --index"
        )


def _check_all_records(gallery: GalleryIndex, index_path) -> None:
    if gallery.lineage.get("level") != "record" or gallery.lineage.get("split") != "all":
        where = index_file(index_path)
        raise ValueError(f"{where}: watch grows record-level indexes of all records (--split all)")


def embed_missing(store_path: str | os.PathLike, name: str, embedder: Embedder) -> int:
    """Embed the committed segments that `features/<name>` lacks and append them (the set is
    created when missing); returns how many segments were embedded. FeatureError when the set
    holds another checkpoint's, lead set's, precision's or normalisation's embeddings;
    StoreBusyError when another writer holds the store."""
    result = embed_store(
        store_path,
        embedder.model.checkpoint,
        name,
        leads=embedder.leads,
        device=embedder.device,
        precision=embedder.precision,
        model=embedder.model,
    )
    return int(result["embedded"])


def index_missing(index_path: str | os.PathLike, store_path: str | os.PathLike, name: str) -> int:
    """Add to the record-level index of every record (`index build --split all`) the records
    of `features/<name>` it lacks; the index is built when its file is missing. Returns the
    vectors added. LineageError when the index holds another model's vectors, StaleIndexError
    when records were forgotten since it was built, ValueError when it is not a record-level
    index over all records."""
    if not index_file(index_path).is_file():
        built = index_from_features(store_path, name, split="all")
        with index_lock(index_path):
            built.save(index_path)
        return len(built)
    gallery = GalleryIndex.load(index_path, main_vectors=False, main_ids=False)  # lineage only
    _check_all_records(gallery, index_path)
    return int(update_index(index_path, Path(store_path), name)["added"])
