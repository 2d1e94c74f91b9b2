"""The gallery: a FAISS index over L2-normalised embeddings with its row ids, patient labels and
lineage, searched, grown by exact delta rows, and saved to and loaded from its index file.

Similarity is the inner product of unit vectors, i.e. cosine similarity. Rows added after the
main file was written are held in an exact flat `delta` part, saved as delta segments chained to
the main file (`save_delta`) or folded into it (`save`); `search` merges the two parts' top-k.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from ecgplat import atomic
from ecgplat.faults import stop_point
from ecgplat.store import read_forgotten, store_file
from retrieval.index.file import (
    DELTA_FORMAT,
    META_FORMAT,
    delta_file,
    delta_files,
    index_file,
    read_framed,
    seq_of,
    stat_key,
    superseded,
    supersedes_entry,
    write_framed,
)
from retrieval.lineage import Lineage

GPU_MAX_K = 2048  # the largest k that FAISS's GPU k-selection takes


class StaleIndexError(ValueError):
    """An index built before `ecgplat forget` withdrew records from its store."""


def check_forget_generation(lineage: dict, where) -> None:
    """Refuse an index whose store has forgotten records since it was built (or last updated
    by ``ecgplat forget --index``): it may still hold their vectors. The store is the recorded
    folder or URL (a published store, whose republish after a forget moves its tombstones); an
    index whose store is not there, or cannot be reached, cannot be checked and passes."""
    store = lineage.get("store")
    if not store:
        return
    try:
        present = store_file(store, "zarr.json") is not None
    except (OSError, ValueError):  # unreachable, or no fsspec package for its scheme
        present = False
    if not present:
        return
    now, have = read_forgotten(store)["generation"], int(lineage.get("forget_generation", 0))
    if have != now:
        raise StaleIndexError(
            f"{where}: built before `ecgplat forget` withdrew records from {store} (forget "
            f"generation {have}, store at {now}); rebuild it with `ecgplat index build` or "
            "pass it to `ecgplat forget --index`"
        )


def check_lineage(index_lineage: dict, query_lineage: dict | None) -> None:
    """Raise LineageError naming the first differing field (None = caller vouches for it)."""
    Lineage(index_lineage).check_query(query_lineage)


def unit_float32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32)).copy()
    if x.ndim != 2:
        raise ValueError(f"expected a (n, dim) matrix of embeddings, got shape {x.shape}")
    faiss.normalize_L2(x)
    return x


def checked_unit_float32(x: np.ndarray, tol: float = 1e-3, chunk: int = 65536) -> np.ndarray:
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


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


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

    @property
    def deferred(self) -> bool:
        """Whether the main rows' ids and labels were left unread (`load(main_ids=False)`)."""
        return self._deferred

    def _searcher(self) -> faiss.Index:
        if self.kind == "flat" and gpu_available():
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
        """(scores (Q, k) float32 cosine, rows (Q, k) int64 gallery rows, -1 = none), best first,
        equal scores in row order (the tie rule of `training.ident_metrics`), which FAISS alone
        does not keep. With delta rows, the main index's top-k and the deltas' exact top-k are
        merged, so a flat main plus deltas answers as one flat index over all rows."""
        check_lineage(self.lineage, lineage)
        if self.index is None:
            raise ValueError("index loaded without its vectors (main_vectors=False): no search")
        q = unit_float32(queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"query embeddings have dim {q.shape[1]}, the index has {self.dim}")
        k = max(1, min(int(k), len(self)))
        main_k = min(k, self.n_main) if self.n_delta else k
        parts, offsets = [], []
        if main_k and self.kind != "flat":  # approximate: its top-k as FAISS finds it
            parts.append(self._searcher().search(q, main_k))
        elif main_k:
            parts.append(_whole_ties(self._exact_search, q, main_k, max(self.n_main, 1)))
        offsets += [0] * len(parts)
        if self.n_delta:
            parts.append(_whole_ties(self.delta.search, q, min(k, self.n_delta), self.n_delta))
            offsets.append(self.n_main)
        return _merge_top_k(parts, offsets, k)  # a lone part too: FAISS orders ties its own way

    def _exact_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The flat main index's top-k (on the GPU up to the k that FAISS selects there)."""
        return (self._searcher() if k <= GPU_MAX_K else self.index).search(q, k)

    def add(self, vectors: np.ndarray, ids: list[str], labels: list[str] | None = None) -> None:
        """Append rows (normalised here) named `ids`, without a rebuild: to the exact delta
        part, written as a delta segment by `save_delta` or folded into the main by `save`."""
        self.add_unit(unit_float32(vectors), ids, labels)

    def add_unit(self, x: np.ndarray, ids: list[str], labels: list[str] | None) -> None:
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
        old = supersedes_entry(index_path)
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
        write_framed(index_path, self.index, meta, "index.before_replace")
        stop_point("index.before_delta_removal")
        for p in delta_files(index_path):
            p.unlink(missing_ok=True)
        self._main_stat, self._leftovers = stat_key(index_path), []
        return index_path

    def save_delta(self, path: str | Path) -> Path | None:
        """Write the rows added since the load as the next delta segment of the main file at
        `path` (which this index was loaded from), atomically; None when there are none."""
        index_path = index_file(path)
        new = self.n_delta - self.saved_delta
        if new <= 0:
            return None
        later = [
            p for p in delta_files(index_path) if seq_of(p) > self.seq and p not in self._leftovers
        ]
        if self._main_stat is None or stat_key(index_path) != self._main_stat or later:
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
        write_framed(out, part, meta, "index.delta_before_replace")
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
        stat = stat_key(index_path)
        head = not (main_vectors or main_ids)
        meta, index = read_framed(index_path, META_FORMAT, main_vectors, head)
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


def _whole_ties(search, q: np.ndarray, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """`search(q, k')`, an exact top-k' over `n` rows, for k' from k + 1 up (doubling) until
    it holds every row tied with each query's k-th score: FAISS keeps an arbitrary part of a
    tie that crosses its k-th place, and `_merge_top_k` can only order the rows it is given."""
    want, k = k, min(k + 1, n)
    while True:
        scores, rows = search(q, k)
        if k >= n or ((rows[:, -1] < 0) | (scores[:, -1] < scores[:, want - 1])).all():
            return scores, rows
        k = min(2 * k, n)


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
    for p in delta_files(index_path):
        seq = seq_of(p)
        if superseded(main_meta, seq, p):
            leftovers.append(p)
            continue
        meta, part = read_framed(p, DELTA_FORMAT, True)
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
        Lineage(main_meta.get("lineage") or {}).require_same(
            meta.get("lineage") or {},
            Lineage.UPDATE_KEYS,
            f"{p}: delta segment has",
            "remove it or rebuild the index",
        )
        out.append((meta, part))
        want += 1
    return out, leftovers
