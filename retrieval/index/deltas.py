"""Growing a saved index: `ecgplat index update` (the feature rows an index lacks, added as a
delta segment, or compacted into a new main file past a fraction) and `ecgplat index compact`."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ecgplat.store import open_store
from retrieval.features import FeatureSet
from retrieval.index.build import Selection, row_names, split_mask
from retrieval.index.file import index_file, index_lock
from retrieval.index.gallery import GalleryIndex, StaleIndexError
from retrieval.lineage import Lineage

# `index update` compacts once the delta rows exceed this fraction of the main file's rows
COMPACT_FRACTION = 0.1


@dataclass
class NewRows:
    """The feature rows an index lacks, with what the update records of the set and store."""

    embeddings: np.ndarray  # float32 (n, D)
    ids: list[str]
    labels: list[str]
    lineage: dict  # the feature set's
    forget_generation: int  # the store's, as of the rows read
    split_generation: str | None


def _tail_selection(store_path, features: str, lineage: dict, n_have: int) -> NewRows | None:
    """Like `Selection` for `update_from_features`, but reading the embeddings and record
    names of the feature rows appended since the index's lineage counted them only, or None
    when that is not known to be exact (no recorded count or split generation, or rows of the
    index no longer selected): then the caller compares whole selections."""
    level, split = lineage.get("level", "record"), lineage.get("split", "gallery")
    key = "n_segments" if level == "segment" else "n_record_rows"
    fs = FeatureSet.named(store_path, features)
    flin = fs.lineage()
    if flin is None:
        fs.open(level)  # raises its one-line FeatureError
    store = open_store(store_path)
    generation = store.forget_generation
    start, n = lineage.get(key), flin.get(key)
    if start is None or n is None or int(n) < int(start):
        return None
    if split != "all" and lineage.get("split_generation") != store.split_generation:
        return None
    start, n = int(start), int(n)
    group = fs.group(level)
    forgotten = store.tombstones["records"]  # as of `generation`
    whole = split != "all" or len(forgotten) > 0  # else every row before `start` is selected
    rec = np.asarray(group["record_index"][0 if whole else start : n], dtype=np.int64)
    take = ~np.isin(rec, forgotten)
    if split != "all":
        take &= split_mask(store.column_codes("ident_split"), split)[rec]
    if (int(take[:start].sum()) if whole else start) != n_have:
        return None
    rec, take = (rec[start:], take[start:]) if whole else (rec, take)
    new = np.flatnonzero(take)
    if not len(new):
        empty = np.zeros((0, int(flin.get("dim", 1))), np.float32)
        return NewRows(empty, [], [], flin, generation, store.split_generation)
    emb = np.asarray(group["embedding"][start:n], dtype=np.float32)[new]
    r = rec[new]
    segments = np.asarray(group["segment_number"][start:n])[new] if level == "segment" else None
    ids = row_names(store.column_at("record_key", r), segments)
    labels = list(store.column_at("patient_key", r))
    return NewRows(emb, ids, labels, flin, generation, store.split_generation)


def _check_update(lineage: dict, flin: dict, generation: int, store_path, features: str) -> None:
    have_generation = int(lineage.get("forget_generation", 0))
    if have_generation != generation:  # it may still hold rows of forgotten records
        raise StaleIndexError(
            f"{store_path}: the index was built before `ecgplat forget` withdrew records (forget "
            f"generation {have_generation}, store at {generation}); rebuild it with `ecgplat "
            "index build` or pass it to `ecgplat forget --index` first"
        )
    Lineage(lineage).require_same(
        flin,
        Lineage.UPDATE_KEYS,
        f"{store_path}: feature set {features!r} has",
        "rebuild the index",
    )


def _whole_selection(index: GalleryIndex, store_path, features: str) -> NewRows:
    """The rows of the whole selection that the index's ids lack."""
    lineage = index.lineage
    level, split = lineage.get("level", "record"), lineage.get("split", "gallery")
    selected = Selection.of(store_path, features, split, level)
    feats, take, store = selected.features, selected.take, selected.store
    ids, labels = selected.names()
    _check_update(lineage, feats.lineage, store.forget_generation, store_path, features)
    have = set(index.ids)
    gone = len(have - set(ids))
    if gone:
        raise ValueError(
            f"{store_path}: {gone} rows of the index are no longer in the {split!r} selection "
            f"of feature set {features!r}; rebuild the index"
        )
    new = np.array([i for i, name in enumerate(ids) if name not in have], dtype=np.int64)
    emb = feats.rows.take(np.flatnonzero(take)[new])[:]
    new_ids, new_labels = [ids[i] for i in new], [labels[i] for i in new]
    return NewRows(
        emb, new_ids, new_labels, feats.lineage, store.forget_generation, store.split_generation
    )


class _NeedsIds(Exception):
    """An update needs the main rows' ids, which were not read (`load(main_ids=False)`)."""


def update_from_features(index: GalleryIndex, store_path: str | os.PathLike, features: str) -> int:
    """Add to `index` the rows of feature set `features` in the index's split selection that it
    does not hold yet (records embedded since it was built), in feature order, without a
    rebuild (as delta rows: see `GalleryIndex.add`); returns how many. Ids, labels and lineage
    are kept (the lineage's counts follow the feature set). Only the appended feature rows are
    read when the lineage's row count and split generation show that the index holds exactly
    the selected rows before them. StaleIndexError when the store has forgotten records since
    the index was built or last passed to `ecgplat forget --index`; LineageError when the set's
    embeddings are of another lineage; ValueError when rows of the index are no longer in the
    selection (re-split records: rebuild).
    """
    lineage = index.lineage
    new = _tail_selection(store_path, features, lineage, len(index))
    if new is not None:
        _check_update(lineage, new.lineage, new.forget_generation, store_path, features)
    elif index.deferred:
        raise _NeedsIds
    else:
        new = _whole_selection(index, store_path, features)
    if len(new.ids):
        index.add(new.embeddings, new.ids, new.labels)
    counts = ("n_records", "n_segments", "n_record_rows")
    index.lineage = {**lineage, **{k: new.lineage[k] for k in counts if k in new.lineage}}
    index.lineage["features"] = features
    index.lineage["forget_generation"] = new.forget_generation
    index.lineage["split_generation"] = new.split_generation
    index.info["updates"] = int(index.info.get("updates", 0)) + 1
    return len(new.ids)


def update_index(
    path: str | os.PathLike,
    store_path: str | os.PathLike,
    features: str,
    compact_fraction: float = COMPACT_FRACTION,
) -> dict:
    """`ecgplat index update`: add the rows embedded since the index at `path` was built or
    last updated as a new delta segment, without reading or rewriting the main file; when the
    delta rows then exceed ``compact_fraction`` of the main file's, compact instead (main and
    deltas folded into a new main file, deltas removed). Returns {"added", "count",
    "compacted", "deltas", "path"}; nothing is written when nothing is added."""
    if not compact_fraction >= 0:
        raise ValueError(f"compact fraction must be >= 0, got {compact_fraction}")
    with index_lock(path):
        return _update_locked(path, store_path, features, compact_fraction)


def _update_locked(path, store_path, features: str, compact_fraction: float) -> dict:
    head = GalleryIndex.load(path, main_vectors=False, main_ids=False)
    try:
        added = update_from_features(head, store_path, features)
    except _NeedsIds:  # the whole selection is compared with the index's ids
        head = GalleryIndex.load(path, main_vectors=False)
        added = update_from_features(head, store_path, features)
    out = {"added": added, "count": len(head), "compacted": False, "path": index_file(path)}
    if added and head.n_delta > compact_fraction * head.n_main:
        full = GalleryIndex.load(path)
        full.add_unit(
            head.delta.reconstruct_n(head.saved_delta, added),
            head.ids[-added:],
            None if head.labels is None else head.labels[-added:],
        )
        full.lineage, full.info = head.lineage, head.info
        full.save(path)
        out["compacted"] = True
    elif added:
        head.save_delta(path)
    out["deltas"] = 0 if out["compacted"] else head.seq
    return out


def compact_index(path: str | os.PathLike) -> dict:
    """`ecgplat index compact`: fold the delta segments of the index at `path` into a new main
    file (atomically) and remove them. Returns {"folded", "count", "path"}."""
    with index_lock(path):
        index = GalleryIndex.load(path, check_store=False)
        folded = index.n_delta
        written = index.save(path) if folded else index_file(path)
    return {"folded": folded, "count": len(index), "path": written}
