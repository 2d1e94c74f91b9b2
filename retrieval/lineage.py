"""The lineage of a set of embeddings (checkpoint, leads, precision, ... as stored with a feature
set or an index) and the rules that say when two lineages may be mixed or compared.

A lineage is stored as a JSON object (a feature set's `zarr.json` attributes, an index file's
description); `Lineage` wraps that dict unchanged, so what is written stays byte for byte what was
read or built, and owns the keys two lineages are matched on:

* `QUERY_KEYS`: between an index and the embeddings used to query it;
* `UPDATE_KEYS`: between an index and the feature set `ecgplat index update` adds from (and its
  delta segments);
* `MODEL_KEYS`: between a feature set and the rows appended to it (or a killed build resumed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar


class LineageError(ValueError):
    """Embeddings of another lineage (checkpoint, lead set, ...) than those they are mixed with."""


def _short(value) -> str:
    s = str(value)
    return s[:12] + "..." if len(s) > 16 else s


@dataclass(frozen=True)
class Lineage:
    """A stored lineage (`values`, the dict as on disk) and the comparisons made on it."""

    values: Mapping[str, Any]

    QUERY_KEYS: ClassVar[tuple[str, ...]] = ("checkpoint_sha256", "leads")
    UPDATE_KEYS: ClassVar[tuple[str, ...]] = (
        "checkpoint_sha256",
        "leads",
        "precision",
        "normalize",
        "store_uuid",
        "dim",
    )
    MODEL_KEYS: ClassVar[tuple[str, ...]] = ("checkpoint_sha256", "leads", "precision", "normalize")

    def get(self, key: str, default=None):
        return self.values.get(key, default)

    def __getitem__(self, key: str):
        return self.values[key]

    def require_same(self, other: Mapping, keys, subject: str, advice: str) -> None:
        """LineageError "`subject` KEY=theirs but the index was built with KEY=ours; `advice`"
        (values shortened) for the first of `keys` this lineage records and `other` has
        differently."""
        for key in keys:
            if key in self.values and self.values.get(key) != other.get(key):
                theirs, ours = _short(other.get(key)), _short(self.values[key])
                raise LineageError(
                    f"{subject} {key}={theirs} but the index was built with {key}={ours}; {advice}"
                )

    def check_query(self, query: Mapping | None) -> None:
        """LineageError naming the first of `QUERY_KEYS` the query embeddings' lineage has
        differently (None = the caller vouches for it)."""
        if query is None:
            return
        self.require_same(
            query,
            self.QUERY_KEYS,
            "query embeddings have",
            "re-embed with the index's checkpoint/leads or rebuild the index",
        )

    def same_model(self, want: Lineage) -> bool:
        """Whether this (stored) feature set's checkpoint, leads and precision are `want`'s (a set
        written before precisions were recorded is fp32)."""
        return all(
            self.values.get(k, "fp32" if k == "precision" else None) == want[k]
            for k in self.MODEL_KEYS[:3]
        )

    def same_normalize(self, want: Lineage) -> bool:
        """Whether the normalisation matches (a set written before it was recorded matches)."""
        return self.values.get("normalize", want["normalize"]) == want["normalize"]

    def same_build(self, want: Lineage) -> bool:
        """Whether a killed build of this lineage can be resumed for `want`: every model key
        and the store's identity recorded and equal."""
        return all(self.values.get(k) == want[k] for k in (*self.MODEL_KEYS, "store_uuid"))
