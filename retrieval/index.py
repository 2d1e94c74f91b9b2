"""FAISS gallery index over L2-normalised embeddings, saved with its id mapping and lineage.

Similarity is the inner product of unit vectors, i.e. cosine similarity (the paper-era
identification score, docs/method.md §6.2). Kinds:

* `flat`  exact `IndexFlatIP` (default; same neighbours as a brute-force similarity matrix);
* `hnsw`  `IndexHNSWFlat` (graph search, no training) for large galleries;
* `ivf`   `IndexIVFFlat` over a flat inner-product coarse quantizer (k-means trained).

Approximate kinds report their recall@1 against exact search on a sample of queries at build
time (`GalleryIndex.info["recall_at_1"]`). Search runs on a GPU copy when FAISS sees a GPU,
else on the CPU. On disk an index is one file, `NAME.faiss`: FAISS's own serialisation followed
by its description (row ids, patient keys, lineage, build info) and a trailer, so the vectors and
their description are replaced together by one atomic rename (`retrieval.index_file`; layout:
docs/formats.md, "FAISS index"). `ecgplat index update` does not rewrite that file: it writes the
new rows as a small exact delta segment `NAME.faiss.delta-NNNNNN` chained to it
(`update_index`); `load` reads the main file and its deltas, `search` merges their top-k, and
once the deltas exceed a fraction of the main a compaction folds them into a new main file.
Queries whose embeddings come from another lineage are refused.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from ecgplat import atomic
from ecgplat.faults import stop_point
from ecgplat.privacy import tombstone_hash
from retrieval.index_file import (
    DELTA_FORMAT,
    INDEX_KINDS,
    META_FORMAT,
    _delta_files,
    _read_framed,
    _replaced,
    _seq_of,
    _stat_key,
    _superseded,
    _write_framed,
    delta_file,
    index_file,
    index_lock,
)

# lineage fields that must agree between an index and the embeddings used to query it
LINEAGE_MATCH_KEYS = ("checkpoint_sha256", "leads")
# lineage fields that must agree between an index and the feature set that `update` adds from
UPDATE_MATCH_KEYS = ("checkpoint_sha256", "leads", "precision", "normalize", "store_uuid", "dim")
# `index update` compacts once the delta rows exceed this fraction of the main file's rows
COMPACT_FRACTION = 0.1


class StaleIndexError(ValueError):
    """An index built before `ecgplat forget` withdrew records from its store."""


def check_forget_generation(lineage: dict, where) -> None:
    """Refuse an index whose store has forgotten records since it was built (or last updated
    by ``ecgplat forget --index``): it may still hold their vectors. An index whose store is
    not at the recorded path cannot be checked and passes."""
    store = lineage.get("store")
    if not store or not (Path(store) / "zarr.json").is_file():
        return
    from ecgplat.store import read_forgotten

    now, have = read_forgotten(store)["generation"], int(lineage.get("forget_generation", 0))
    if have != now:
        raise StaleIndexError(
            f"{where}: built before `ecgplat forget` withdrew records from {store} (forget "
            f"generation {have}, store at {now}); rebuild it with `ecgplat index build` or "
            "pass it to `ecgplat forget --index`"
        )


class LineageError(ValueError):
    """Query embeddings were produced by a different checkpoint or lead set than the index."""


def check_lineage(index_lineage: dict, query_lineage: dict | None) -> None:
    """Raise LineageError naming the first differing field (None = caller vouches for it)."""
    if query_lineage is None:
        return
    _require_same(
        index_lineage,
        query_lineage,
        LINEAGE_MATCH_KEYS,
        "query embeddings have",
        "re-embed with the index's checkpoint/leads or rebuild the index",
    )


def _require_same(index_lineage: dict, other: dict, keys, subject: str, advice: str) -> None:
    """LineageError "`subject` KEY=theirs but the index was built with KEY=ours; `advice`"
    (values shortened) for the first of `keys` the index records and `other` has
    differently."""
    for key in keys:
        if key in index_lineage and index_lineage.get(key) != other.get(key):
            theirs, ours = _short(other.get(key)), _short(index_lineage[key])
            raise LineageError(
                f"{subject} {key}={theirs} but the index was built with {key}={ours}; {advice}"
            )


def _short(value) -> str:
    s = str(value)
    return s[:12] + "..." if len(s) > 16 else s


def _unit_float32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32)).copy()
    if x.ndim != 2:
        raise ValueError(f"expected a (n, dim) matrix of embeddings, got shape {x.shape}")
    faiss.normalize_L2(x)
    return x


def _checked_unit_float32(x: np.ndarray, tol: float = 1e-3, chunk: int = 65536) -> np.ndarray:
    """`x` itself (no copy) if it is a C-contiguous float32 (n, dim) matrix of unit rows."""
    if not (
        isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2 and x.flags.c_contiguous
    ):
        raise ValueError(
            "copy=False needs a C-contiguous float32 (n, dim) matrix, got "
            f"{getattr(x, 'dtype', type(x))} of shape {np.shape(x)}"
        )
    for s in range(0, len(x), chunk):
        norms = np.linalg.norm(x[s : s + chunk], axis=1)
        if norms.size and np.abs(norms - 1).max() > tol:
            raise ValueError(
                "copy=False needs L2-normalised rows; row "
                f"{s + int(np.abs(norms - 1).argmax())} has norm "
                f"{norms[np.abs(norms - 1).argmax()]:.4f}"
            )
    return x


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def default_params(kind: str, n: int) -> dict:
    """Build/search parameters scaled with the gallery size."""
    if kind == "hnsw":
        return {"M": 32, "ef_construction": 80, "ef_search": 128}
    if kind == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        return {"nlist": nlist, "nprobe": max(1, min(nlist, 16))}
    return {}


ADD_ROWS = 2048  # gallery rows normalised and added to FAISS at a time (0.5 MB at dim 64)


def _unit_rows(vectors, copy: bool, rows=None) -> np.ndarray:
    """Rows `rows` (a slice or ascending positions; default all) of `vectors` as unit float32:
    a normalised working copy, or with ``copy=False`` the rows as given (checked)."""
    part = vectors[slice(None) if rows is None else rows]
    return _unit_float32(part) if copy else _checked_unit_float32(part)


def _add_in_parts(index: faiss.Index, vectors, copy: bool) -> None:
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
                xb[rows] = _checked_unit_float32(vectors[rows])
        index.ntotal = n
        return
    for s in range(0, n, ADD_ROWS):
        index.add(_unit_rows(vectors, copy, slice(s, s + ADD_ROWS)))


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
        index.train(_unit_rows(vectors, copy, rows))
        index.nprobe = int(params["nprobe"])
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    _add_in_parts(index, vectors, copy)
    return index


@dataclass
class GalleryIndex:
    """A FAISS index plus what its rows are and where their embeddings came from.

    Rows 0..n_main-1 are the main index's (`index`), the rest those of `delta`: an exact flat
    index of the rows added since the main file was written (its delta segments on disk, then
    rows added in memory and not saved yet). Row numbers, `ids` and `labels` span both."""

    index: faiss.Index | None
    kind: str
    ids: list[str]
    labels: list[str] | None = None
    lineage: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    delta: faiss.Index | None = None
    uid: str | None = None  # identity of the main file this was loaded from
    seq: int = 0  # delta segments of that file loaded
    saved_delta: int = 0  # rows of `delta` already in those segments
    n_main: int = -1  # rows of the main index (also when loaded without its vectors)
    _gpu_index: object = field(default=None, repr=False)
    _main_stat: tuple | None = field(default=None, repr=False)  # of the file loaded
    _leftovers: list = field(default_factory=list, repr=False)  # superseded deltas seen there
    _deferred: bool = field(default=False, repr=False)  # main rows' ids/labels not read

    def __post_init__(self) -> None:
        if self.n_main < 0:
            self.n_main = int(self.index.ntotal)
        part = self.index if self.index is not None else self.delta
        self._dim = 0 if part is None else int(part.d)

    def __len__(self) -> int:
        return self.n_main + self.n_delta

    @property
    def n_delta(self) -> int:
        return 0 if self.delta is None else int(self.delta.ntotal)

    @property
    def dim(self) -> int:
        return self._dim

    def _searcher(self) -> faiss.Index:
        if self.kind == "flat" and _gpu_available():
            if self._gpu_index is None:
                try:
                    res = faiss.StandardGpuResources()
                    self._gpu_index = (res, faiss.index_cpu_to_gpu(res, 0, self.index))
                except RuntimeError:
                    self._gpu_index = False  # a broken GPU build: stay on the CPU
            if self._gpu_index:
                return self._gpu_index[1]
        return self.index

    def search(
        self, queries: np.ndarray, k: int, lineage: dict | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k) float32 cosine, rows (Q, k) int64 gallery rows, -1 = none), best first.
        With delta rows, the main index's top-k and the deltas' exact top-k are merged."""
        check_lineage(self.lineage, lineage)
        if self.index is None:
            raise ValueError("index loaded without its vectors (main_vectors=False): no search")
        q = _unit_float32(queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"query embeddings have dim {q.shape[1]}, the index has {self.dim}")
        k = max(1, min(int(k), len(self)))
        if not self.n_delta:
            scores, rows = self._searcher().search(q, k)
            return scores, rows.astype(np.int64)
        parts = [self.delta.search(q, min(k, self.n_delta))]
        if self.n_main:
            parts.insert(0, self._searcher().search(q, min(k, self.n_main)))
        offsets = [0, self.n_main] if self.n_main else [self.n_main]
        return _merge_top_k(parts, offsets, k)

    def add(self, vectors: np.ndarray, ids: list[str], labels: list[str] | None = None) -> None:
        """Append rows (normalised here) named `ids`, without a rebuild: to the exact delta
        part, written as a delta segment by `save_delta` or folded into the main by `save`."""
        self._add_unit(_unit_float32(vectors), ids, labels)

    def _add_unit(self, x: np.ndarray, ids: list[str], labels: list[str] | None) -> None:
        """`add` of rows already normalised (by an earlier `add`: normalising twice may
        change their last bits)."""
        if x.shape[1] != self.dim or len(ids) != len(x):
            raise ValueError(f"{len(x)} vectors of dim {x.shape[1]} and {len(ids)} ids to add")
        if self.delta is None:
            self.delta = faiss.IndexFlatIP(self.dim)
        self.delta.add(x)
        self._append_names(ids, labels)

    def _append_names(self, ids: list[str], labels: list[str] | None) -> None:
        self.ids = list(self.ids) + list(ids)
        if self.labels is not None:
            self.labels = list(self.labels) + list(labels or [""] * len(ids))

    def compact(self) -> None:
        """Fold the delta rows into the main index in memory (`add`: a flat main then equals a
        build over all rows; HNSW inserts them into its graph, IVF into its trained lists)."""
        if self.index is None:
            raise ValueError("index loaded without its vectors (main_vectors=False): no compaction")
        if self.n_delta:
            self.index.add(self.delta.reconstruct_n(0, self.n_delta))
        self.n_main, self.delta, self.saved_delta = int(self.index.ntotal), None, 0
        self._gpu_index = None

    def save(self, path: str | Path) -> Path:
        """Write the index (delta rows folded into the main) and its description as one file,
        replaced atomically (a reader or a crash sees the old index or the new one, never a
        mix), then remove the delta segments of the file it replaced; returns its path."""
        self.compact()
        index_path = index_file(path)
        index_path.parent.mkdir(parents=True, exist_ok=True)
        old = _replaced(index_path)
        self.uid, self.seq = uuid.uuid4().hex, 0
        meta = {
            "format": META_FORMAT,
            "uid": self.uid,
            "kind": self.kind,
            "dim": self.dim,
            "count": len(self),
            "labelled": self.labels is not None,
            "lineage": self.lineage,
            "info": self.info,
        }
        if old is not None:  # its deltas, should a kill leave them behind, are ignored
            meta["supersedes"] = old
        meta["ids"] = list(self.ids)  # row names last: `load(main_ids=False)` stops before them
        meta["labels"] = None if self.labels is None else list(self.labels)
        atomic.remove_temps(index_path.parent, index_path.name + "*")  # of killed writers
        _write_framed(index_path, self.index, meta, "index.before_replace")
        stop_point("index.before_delta_removal")
        for p in _delta_files(index_path):
            p.unlink(missing_ok=True)
        self._main_stat, self._leftovers = _stat_key(index_path), []
        return index_path

    def save_delta(self, path: str | Path) -> Path | None:
        """Write the rows added since the load as the next delta segment of the main file at
        `path` (which this index was loaded from), atomically; None when there are none."""
        index_path = index_file(path)
        new = self.n_delta - self.saved_delta
        if new <= 0:
            return None
        later = [
            p
            for p in _delta_files(index_path)
            if _seq_of(p) > self.seq and p not in self._leftovers
        ]
        if self._main_stat is None or _stat_key(index_path) != self._main_stat or later:
            raise ValueError(
                f"{index_path}: changed since this index was loaded from it (or it was not "
                "loaded from it); load it again"
            )
        for p in self._leftovers:
            p.unlink(missing_ok=True)
        self._leftovers = []
        seq, lo = self.seq + 1, self.n_main + self.saved_delta
        part = faiss.IndexFlatIP(self.dim)
        part.add(self.delta.reconstruct_n(self.saved_delta, new))
        meta = {
            "format": DELTA_FORMAT,
            "main": self.uid,
            "seq": seq,
            "kind": "flat",
            "dim": self.dim,
            "count": new,
            "ids": self.ids[lo:],
            "labels": None if self.labels is None else self.labels[lo:],
            "lineage": self.lineage,
            "info": self.info,
        }
        atomic.remove_temps(index_path.parent, index_path.name + "*")
        out = delta_file(index_path, seq)
        _write_framed(out, part, meta, "index.delta_before_replace")
        self.seq, self.saved_delta = seq, self.n_delta
        return out

    def drop_rows(self, rows) -> None:
        """Remove gallery rows (e.g. of forgotten records) in place, delta rows included (they
        are folded into the main first): the kept vectors are added, in order, to an emptied
        clone of the index (trained state and parameters kept), so row numbers stay 0..n-1 for
        every kind (HNSW has no removal of its own)."""
        drop = np.zeros(len(self), dtype=bool)
        drop[np.asarray(list(rows), dtype=np.int64)] = True
        if not drop.any():
            return
        self.compact()
        ivf = faiss.extract_index_ivf(self.index) if self.kind == "ivf" else None
        if ivf is not None:
            ivf.make_direct_map()
        vectors = self.index.reconstruct_n(0, len(self))
        if ivf is not None:
            ivf.set_direct_map_type(faiss.DirectMap.NoMap)
        index = faiss.clone_index(self.index)
        index.reset()
        index.add(np.ascontiguousarray(vectors[~drop]))
        keep = np.flatnonzero(~drop)
        self.index, self._gpu_index, self.n_main = index, None, len(keep)
        self.ids = [self.ids[i] for i in keep]
        self.labels = None if self.labels is None else [self.labels[i] for i in keep]

    @classmethod
    def load(
        cls,
        path: str | Path,
        check_store: bool = True,
        main_vectors: bool = True,
        main_ids: bool = True,
    ) -> GalleryIndex:
        """Read an index file and its delta segments; FileNotFoundError / ValueError (one line
        naming the file) when it is missing, not an ecgplat index, or a delta is not of this
        file or one is missing; StaleIndexError when its store has forgotten records since
        (``check_store=False``: for ``ecgplat forget`` itself). ``main_vectors=False`` reads
        the main file's description only (for `update_index`: no search, no `save`);
        with ``main_ids=False`` too, not even its row names: the main rows' `ids` and `labels`
        are then None placeholders."""
        index_path = index_file(path)
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path}: index file not found")
        stat = _stat_key(index_path)
        head = not (main_vectors or main_ids)
        meta, index = _read_framed(index_path, META_FORMAT, main_vectors, head)
        if meta.get("deferred"):
            meta["ids"] = [None] * meta["count"]
            meta["labels"] = meta["ids"] if meta.get("labelled") else None
        deltas, leftovers = _read_deltas(index_path, meta)
        last = deltas[-1][0] if deltas else meta  # the newest lineage and info
        lineage = last.get("lineage") or {}
        if check_store:
            check_forget_generation(lineage, index_path)
        gallery = cls(
            index=index,
            kind=meta["kind"],
            ids=meta["ids"],
            labels=meta.get("labels"),
            lineage=lineage,
            info=last.get("info") or {},
            uid=meta["uid"],
            n_main=meta["count"],
            _main_stat=stat,
            _leftovers=leftovers,
            _deferred=bool(meta.get("deferred")),
        )
        if index is None:
            gallery._dim = meta["dim"]
        for d_meta, d_index in deltas:
            gallery._attach(d_meta, d_index)
        return gallery

    def _attach(self, meta: dict, part: faiss.Index) -> None:
        """Append a loaded delta segment."""
        if self.delta is None:
            self.delta = part
        else:
            self.delta.add(part.reconstruct_n(0, part.ntotal))
        self._append_names(meta["ids"], meta.get("labels"))
        self.seq, self.saved_delta = meta["seq"], self.n_delta


def _merge_top_k(parts, offsets, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-part (scores, rows) into the overall top-k, best first; equal scores in row
    order, and missing hits (-1) last."""
    scores = np.concatenate([s for s, _ in parts], axis=1)
    rows = np.concatenate(
        [
            np.where(r < 0, -1, r.astype(np.int64) + off)
            for (_, r), off in zip(parts, offsets, strict=True)
        ],
        axis=1,
    )
    missing = rows < 0
    key_rows = np.where(missing, np.iinfo(np.int64).max, rows)
    key_scores = np.where(missing, np.inf, -scores.astype(np.float64))
    order = np.lexsort((key_rows, key_scores), axis=1)[:, :k]
    out_scores = np.take_along_axis(scores, order, axis=1)
    out_rows = np.take_along_axis(rows, order, axis=1)
    return np.ascontiguousarray(out_scores), np.ascontiguousarray(out_rows)


def _read_deltas(index_path: Path, main_meta: dict) -> tuple[list, list[Path]]:
    """([(description, flat index)] of the delta segments of the main file described by
    `main_meta`, in order], [superseded delta files left by a killed compaction]); ValueError
    (one line naming the delta) for a delta of another index, a gap, or another lineage."""
    out, want, leftovers = [], 1, []
    for p in _delta_files(index_path):
        seq = _seq_of(p)
        if _superseded(main_meta, seq, p):
            leftovers.append(p)
            continue
        meta, part = _read_framed(p, DELTA_FORMAT, True)
        if meta.get("main") != main_meta["uid"]:
            raise ValueError(
                f"{p}: a delta segment of another index, not of {index_path.name}; "
                "remove it or rebuild the index"
            )
        if seq != want or meta.get("seq") != seq:
            raise ValueError(
                f"{p}: delta segment {want} of {index_path.name} is missing (chain broken); "
                "rebuild the index"
            )
        if meta["dim"] != main_meta["dim"]:
            raise ValueError(f"{p}: dim {meta['dim']} but {index_path.name} has {main_meta['dim']}")
        _require_same(
            main_meta.get("lineage") or {},
            meta.get("lineage") or {},
            UPDATE_MATCH_KEYS,
            f"{p}: delta segment has",
            "remove it or rebuild the index",
        )
        out.append((meta, part))
        want += 1
    return out, leftovers


def recall_at_1(approx: faiss.Index, exact: faiss.Index, queries: np.ndarray) -> float:
    """Fraction of queries whose approximate top-1 row equals the exact top-1 row."""
    q = _unit_float32(queries)
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

    `vectors` is an array, or rows read on demand (`retrieval.embed.FeatureRows`): either way
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
            sample = _unit_rows(vectors, copy, np.sort(rows))[np.argsort(np.argsort(rows))]
            sample = sample + rng.normal(0, 0.5 / math.sqrt(dim), (len(rows), dim))
            info["recall_sample"] = "noisy gallery rows"
        else:
            sq = np.asarray(sample_queries, dtype=np.float32)
            sample = sq[rng.choice(len(sq), min(n_sample, len(sq)), replace=False)]
            info["recall_sample"] = "given queries"
        exact = faiss.IndexFlatIP(dim)
        _add_in_parts(exact, vectors, copy)
        info["recall_at_1"] = recall_at_1(index, exact, sample)
        info["recall_n"] = len(sample)
    return GalleryIndex(
        index=index, kind=kind, ids=list(ids), labels=labels, lineage=dict(lineage or {}), info=info
    )


def _is(column_codes: tuple[np.ndarray, np.ndarray], value: str) -> np.ndarray:
    """Per record, whether a column given as `EcgStore.column_codes` holds `value`."""
    codes, values = column_codes
    at = int(np.searchsorted(values, value))
    return codes == at if at < len(values) and values[at] == value else np.zeros(len(codes), bool)


def _row_names(keys, segment_number) -> list[str]:
    """Index row names: the record keys, or `record_key#segment` at segment level."""
    if segment_number is None:
        return list(keys)
    return [f"{k}#{int(s)}" for k, s in zip(keys, segment_number, strict=True)]


def _selection(store_path, features: str, split: str, level: str):
    """(the feature set, its embeddings still on disk; which of its rows are in `split`; which
    are probes; a function reading the selected rows' ids and patient labels; the store view,
    opened before the rows were read: its forget and split generations) of a stored feature
    set."""
    from ecgplat.store import open_store
    from retrieval.embed import open_features

    store = open_store(store_path)
    feats = open_features(store_path, features, level)
    # three per-record columns, not the whole record table (features hold live records only)
    role = store.column_codes("ident_split")
    probe = _is(role, "probe")[feats.record_index]
    take = np.ones(len(probe), bool) if split == "all" else _is(role, split)[feats.record_index]

    def names() -> tuple[list[str], list[str]]:  # the keys of the selected records only
        keys = store.column_at("record_key", feats.record_index[take])
        segments = feats.segment_number[take] if level == "segment" else None
        return _row_names(keys, segments), list(
            store.column_at("patient_key", feats.record_index[take])
        )

    return feats, take, probe, names, store


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
    feats, take, probe, names, store = _selection(store_path, features, split, level)
    if not take.any():
        raise ValueError(
            f"{store_path}: no records in ident split {split!r} "
            "(run `ecgplat split --ident`, or use --split all)"
        )
    # the probes measure an approximate index's recall; only the selected rows are read
    probes = (
        feats.rows.take(np.flatnonzero(probe))[:] if split != "probe" and kind != "flat" else None
    )
    lineage = {k: v for k, v in feats.lineage.items() if k != "config"}
    lineage.update(
        {
            "features": features,
            "level": level,
            "split": split,
            "store": str(Path(store_path).resolve()),
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
    index.ids, index.labels = names()
    return index


def _tail_selection(store_path, features: str, lineage: dict, n_have: int):
    """Like `_selection` for `update_from_features`, but reading the embeddings and record
    names of the feature rows appended since the index's lineage counted them only:
    (new embeddings, their ids, their labels, feature lineage, forget generation, split
    generation), or None when that is not known to be exact (no recorded count or split
    generation, or rows of the index no longer selected): then the caller compares whole
    selections."""
    import zarr

    from ecgplat.store import open_store
    from retrieval.embed import feature_dir, open_features, read_lineage

    level, split = lineage.get("level", "record"), lineage.get("split", "gallery")
    key = "n_segments" if level == "segment" else "n_record_rows"
    flin = read_lineage(store_path, features)
    if flin is None:
        open_features(store_path, features, level)  # raises its one-line FeatureError
    store = open_store(store_path)
    generation = store.forget_generation
    start, n = lineage.get(key), flin.get(key)
    if start is None or n is None or int(n) < int(start):
        return None
    if split != "all" and lineage.get("split_generation") != store.split_generation:
        return None
    start, n = int(start), int(n)
    group = zarr.open_group(str(feature_dir(store_path, features) / level), mode="r")
    forgotten = store.tombstones["records"]  # as of `generation`
    whole = split != "all" or len(forgotten) > 0  # else every row before `start` is selected
    rec = np.asarray(group["record_index"][0 if whole else start : n], dtype=np.int64)
    take = ~np.isin(rec, forgotten)
    if split != "all":
        take &= _is(store.column_codes("ident_split"), split)[rec]
    if (int(take[:start].sum()) if whole else start) != n_have:
        return None
    rec, take = (rec[start:], take[start:]) if whole else (rec, take)
    new = np.flatnonzero(take)
    if not len(new):
        empty = np.zeros((0, int(flin.get("dim", 1))), np.float32)
        return empty, [], [], flin, generation, store.split_generation
    emb = np.asarray(group["embedding"][start:n], dtype=np.float32)[new]
    r = rec[new]
    segments = np.asarray(group["segment_number"][start:n])[new] if level == "segment" else None
    ids = _row_names(store.column_at("record_key", r), segments)
    labels = list(store.column_at("patient_key", r))
    return emb, ids, labels, flin, generation, store.split_generation


def _check_update(lineage: dict, flin: dict, generation: int, store_path, features: str) -> None:
    have_generation = int(lineage.get("forget_generation", 0))
    if have_generation != generation:  # it may still hold rows of forgotten records
        raise StaleIndexError(
            f"{store_path}: the index was built before `ecgplat forget` withdrew records (forget "
            f"generation {have_generation}, store at {generation}); rebuild it with `ecgplat "
            "index build` or pass it to `ecgplat forget --index` first"
        )
    _require_same(
        lineage,
        flin,
        UPDATE_MATCH_KEYS,
        f"{store_path}: feature set {features!r} has",
        "rebuild the index",
    )


def _whole_selection(index: GalleryIndex, store_path, features: str):
    """(new embeddings, ids, labels, feature lineage, forget generation, split generation) from
    the whole selection, compared with the index's ids."""
    lineage = index.lineage
    level, split = lineage.get("level", "record"), lineage.get("split", "gallery")
    feats, take, _, names, store = _selection(store_path, features, split, level)
    ids, labels = names()
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
    generations = store.forget_generation, store.split_generation
    return emb, new_ids, new_labels, feats.lineage, *generations


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
    tail = _tail_selection(store_path, features, lineage, len(index))
    if tail is not None:
        _check_update(lineage, tail[3], tail[4], store_path, features)
    elif index._deferred:
        raise _NeedsIds
    else:
        tail = _whole_selection(index, store_path, features)
    emb, ids, labels, flin, generation, split_generation = tail
    if len(ids):
        index.add(emb, ids, labels)
    counts = ("n_records", "n_segments", "n_record_rows")
    index.lineage = {**lineage, **{k: flin[k] for k in counts if k in flin}}
    index.lineage["features"] = features
    index.lineage["forget_generation"] = generation
    index.lineage["split_generation"] = split_generation
    index.info["updates"] = int(index.info.get("updates", 0)) + 1
    return len(ids)


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
        full._add_unit(
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
