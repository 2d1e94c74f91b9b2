"""Keeping an index file in step with `ecgplat forget`: `ForgetIndex` drops the forgotten
records' rows (main file and deltas) and stamps the store's forget generation."""

from __future__ import annotations

import os
from pathlib import Path

from ecgplat.privacy import tombstone_hash
from retrieval.index.file import index_lock
from retrieval.index.gallery import GalleryIndex


class ForgetIndex:
    """An index file kept in step with a store by `ecgplat.store.forget.forget`: checked to be of
    that store before the forget changes anything, then (under the index's lock, reloaded with
    its deltas) rewritten without the forgotten records' rows and stamped with the store's
    forget generation."""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self.lineage = GalleryIndex.load(path, check_store=False).lineage

    def check_store(self, reader) -> None:
        """ValueError unless the index was built from the store `reader` has open."""
        uuid_, where = self.lineage.get("store_uuid"), self.lineage.get("store")
        same = (
            uuid_ == reader.attrs.get("store_uuid")
            if uuid_
            else where and Path(where).resolve() == reader.path.resolve()
        )
        if not same:
            raise ValueError(f"{self.path}: the index was not built from {reader.path}")

    def scrub(self, key_hashes: set, secret: bytes, generation: int) -> int:
        """Drop the rows of forgotten records (rows are named by record key or
        ``record_key#segment``; `key_hashes` are their tombstone hashes); returns how many."""
        with index_lock(self.path):
            gallery = GalleryIndex.load(self.path, check_store=False)
            segment_level = gallery.lineage.get("level", "record") == "segment"
            keys = (r.rsplit("#", 1)[0] if segment_level else r for r in gallery.ids)
            hashes = (tombstone_hash("record", key, secret) for key in keys)
            drop = [i for i, h in enumerate(hashes) if h in key_hashes]
            if drop or gallery.lineage.get("forget_generation", 0) != generation:
                gallery.drop_rows(drop)
                gallery.lineage = dict(gallery.lineage, forget_generation=generation)
                gallery.info = {k: v for k, v in gallery.info.items() if not k.startswith("recall")}
                gallery.save(self.path)
        return len(drop)
