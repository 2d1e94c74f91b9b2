"""Building a gallery index: FAISS indexes of each kind filled part by part, their recall, and
the index over an ident split of a stored feature set (`ecgplat index build`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from ecgplat.store import EcgStore, is_url, open_store
from retrieval.features import StoredFeatures, open_features
from retrieval.index.file import INDEX_KINDS
from retrieval.index.gallery import GalleryIndex, checked_unit_float32, unit_float32


def default_params(kind: str, n: int) -> dict:
    """Build/search parameters scaled with the gallery size."""
    if kind == "hnsw":
        return {"M": 32, "ef_construction": 80, "ef_search": 128}
    if kind == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        return {"nlist": nlist, "nprobe": max(1, min(nlist, 16))}
    return {}


ADD_ROWS = 2048  # gallery rows normalised and added to FAISS at a time (0.5 MB at dim 64)


def unit_rows(vectors, copy: bool, rows=None) -> np.ndarray:
    """Rows `rows` (a slice or ascending positions; default all) of `vectors` as unit float32:
    a normalised working copy, or with ``copy=False`` the rows as given (checked)."""
    part = vectors[slice(None) if rows is None else rows]
    return unit_float32(part) if copy else checked_unit_float32(part)


def add_in_parts(index: faiss.Index, vectors, copy: bool) -> None:
    """`index.add` of every row of `vectors`, `ADD_ROWS` at a time: only FAISS's own storage
    grows with the gallery, not a whole working copy of it. An empty flat index is instead
    filled in place: its storage (the float32 rows, `get_xb`) is sized once and written part by
    part, the same bytes as `add` without the copies of a growing buffer."""
    n = len(vectors)
    if type(index) is faiss.IndexFlatIP and index.ntotal == 0:
        index.codes.resize(n * index.code_size)
        xb = faiss.rev_swig_ptr(index.get_xb(), n * index.d).reshape(n, index.d)
        for s in range(0, n, ADD_ROWS):
            rows = slice(s, s + ADD_ROWS)
            if copy:  # normalised where they are stored: no working copy
                xb[rows] = vectors[rows]
                faiss.normalize_L2(xb[rows])
            else:
                xb[rows] = checked_unit_float32(vectors[rows])
        index.ntotal = n
        return
    for s in range(0, n, ADD_ROWS):
        index.add(unit_rows(vectors, copy, slice(s, s + ADD_ROWS)))


def _make_index(kind: str, dim: int, vectors, params: dict, seed: int, copy: bool) -> faiss.Index:
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params["ef_construction"])
        index.hnsw.efSearch = int(params["ef_search"])
    elif kind == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, int(params["nlist"]), faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.niter = int(params.get("niter", 10))
        # FAISS wants >= 39 per list; more only costs time. `max_train` caps the k-means sample
        # (e.g. 50-100k rows for a 1M gallery, where 64 per list would be a slow training run).
        max_train = int(params.get("max_train", 64 * int(params["nlist"])))
        rows = None
        if len(vectors) > max_train:
            rows = np.sort(
                np.random.default_rng(seed).choice(len(vectors), max_train, replace=False)
            )
        index.train(unit_rows(vectors, copy, rows))
        index.nprobe = int(params["nprobe"])
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    add_in_parts(index, vectors, copy)
    return index


def recall_at_1(approx: faiss.Index, exact: faiss.Index, queries: np.ndarray) -> float:
    """Fraction of queries whose approximate top-1 row equals the exact top-1 row."""
    q = unit_float32(queries)
    _, a = approx.search(q, 1)
    _, e = exact.search(q, 1)
    return float((a[:, 0] == e[:, 0]).mean())


def build_index(
    vectors,
    ids: list[str],
    lineage: dict | None = None,
    kind: str = "flat",
    labels: list[str] | None = None,
    sample_queries: np.ndarray | None = None,
    n_sample: int = 1000,
    params: dict | None = None,
    seed: int = 0,
    copy: bool = True,
) -> GalleryIndex:
    """Index `vectors` (n, dim) whose rows are named by `ids`.

    `vectors` is an array, or rows read on demand (`retrieval.features.FeatureRows`): either way
    they are normalised and added `ADD_ROWS` at a time, so besides FAISS's own storage only one
    part is held. For approximate kinds, recall@1 against exact search is measured on up to
    `n_sample` rows of `sample_queries` (e.g. probe embeddings); without them, on noisy copies of
    gallery rows. `n_sample=0` skips that measurement (and the exact index it needs: one more
    gallery-size buffer). `copy=False` indexes the rows as given, without normalised float32
    working copies; they must then already be float32 unit rows (checked).
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    if not hasattr(vectors, "shape") or not hasattr(vectors, "__getitem__"):
        vectors = np.asarray(vectors, dtype=np.float32)
    if len(vectors.shape) != 2:
        raise ValueError(f"expected a (n, dim) matrix of embeddings, got shape {vectors.shape}")
    n, dim = len(vectors), int(vectors.shape[1])
    if n == 0:
        raise ValueError("cannot build an index over an empty gallery")
    if len(ids) != n or (labels is not None and len(labels) != n):
        raise ValueError(
            f"{n} vectors but {len(ids)} ids"
            + ("" if labels is None else f" and {len(labels)} labels")
        )
    p = {**default_params(kind, n), **(params or {})}
    index = _make_index(kind, dim, vectors, p, seed, copy)
    info: dict = {"params": p}
    if kind != "flat" and n_sample > 0:
        rng = np.random.default_rng(seed)
        if sample_queries is None or len(sample_queries) == 0:
            rows = rng.choice(n, min(n_sample, n), replace=False)
            sample = unit_rows(vectors, copy, np.sort(rows))[np.argsort(np.argsort(rows))]
            sample = sample + rng.normal(0, 0.5 / math.sqrt(dim), (len(rows), dim))
            info["recall_sample"] = "noisy gallery rows"
        else:
            sq = np.asarray(sample_queries, dtype=np.float32)
            sample = sq[rng.choice(len(sq), min(n_sample, len(sq)), replace=False)]
            info["recall_sample"] = "given queries"
        exact = faiss.IndexFlatIP(dim)
        add_in_parts(exact, vectors, copy)
        info["recall_at_1"] = recall_at_1(index, exact, sample)
        info["recall_n"] = len(sample)
    return GalleryIndex(
        index=index, kind=kind, ids=list(ids), labels=labels, lineage=dict(lineage or {}), info=info
    )


def split_mask(column_codes: tuple[np.ndarray, np.ndarray], value: str) -> np.ndarray:
    """Per record, whether a column given as `EcgStore.column_codes` holds `value`."""
    codes, values = column_codes
    at = int(np.searchsorted(values, value))
    return codes == at if at < len(values) and values[at] == value else np.zeros(len(codes), bool)


def row_names(keys, segment_number) -> list[str]:
    """Index row names: the record keys, or `record_key#segment` at segment level."""
    if segment_number is None:
        return list(keys)
    return [f"{k}#{int(s)}" for k, s in zip(keys, segment_number, strict=True)]


@dataclass
class Selection:
    """The rows of a stored feature set in an ident split, their embeddings still on disk."""

    features: StoredFeatures
    take: np.ndarray  # bool per feature row: in the split
    probe: np.ndarray  # bool per feature row: a probe
    store: EcgStore  # the store view, opened before the rows were read: its generations
    level: str

    @classmethod
    def of(cls, store_path, features: str, split: str, level: str) -> Selection:
        """The rows of feature set `features` at `level` in `split` (or "all")."""
        store = open_store(store_path)
        feats = open_features(store_path, features, level)
        # three per-record columns, not the whole record table (features hold live records only)
        role = store.column_codes("ident_split")
        probe = split_mask(role, "probe")[feats.record_index]
        take = (
            np.ones(len(probe), bool)
            if split == "all"
            else split_mask(role, split)[feats.record_index]
        )
        return cls(feats, take, probe, store, level)

    def names(self) -> tuple[list[str], list[str]]:
        """(ids, patient labels) of the selected rows, read from the store's columns."""
        records = self.features.record_index[self.take]
        segments = self.features.segment_number[self.take] if self.level == "segment" else None
        keys = self.store.column_at("record_key", records)
        return row_names(keys, segments), list(self.store.column_at("patient_key", records))


def index_from_features(
    store_path: str | os.PathLike,
    features: str,
    split: str = "gallery",
    kind: str = "flat",
    level: str = "record",
    params: dict | None = None,
) -> GalleryIndex:
    """An index over the `split` records ("gallery", "probe" or "all") of a stored feature set.

    Rows are named by record key (record level) or `record_key#segment` (segment level) and
    labelled by pseudonymised patient key. Approximate kinds measure recall@1 on the probe
    embeddings when the store has a probe split.
    """
    selected = Selection.of(store_path, features, split, level)
    feats, take, store = selected.features, selected.take, selected.store
    if not take.any():
        raise ValueError(
            f"{store_path}: no records in ident split {split!r} "
            "(run `ecgplat split --ident`, or use --split all)"
        )
    # the probes measure an approximate index's recall; only the selected rows are read
    probes = (
        feats.rows.take(np.flatnonzero(selected.probe))[:]
        if split != "probe" and kind != "flat"
        else None
    )
    lineage = {k: v for k, v in feats.lineage.items() if k != "config"}
    lineage.update(
        {
            "features": features,
            "level": level,
            "split": split,
            "store": str(store_path) if is_url(store_path) else str(Path(store_path).resolve()),
            "forget_generation": store.forget_generation,
            "split_generation": store.split_generation,
        }
    )
    n = int(take.sum())
    index = build_index(
        feats.rows.take(np.flatnonzero(take)),  # read part by part while added
        [""] * n,  # named below
        lineage=lineage,
        kind=kind,
        labels=[""] * n,
        sample_queries=probes,
        params=params,
    )
    # the row names are read once the vectors are in FAISS, so that the add's read buffers and
    # the names (two Python str per row) are never held at the same time
    index.ids, index.labels = selected.names()
    return index
