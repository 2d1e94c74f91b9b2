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
their description are replaced together by one atomic rename (layout: docs/formats.md, "FAISS
index"). Queries whose embeddings come from another lineage are refused.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from ecgplat import atomic
from ecgplat.faults import stop_point

INDEX_KINDS = ("flat", "hnsw", "ivf")
# lineage fields that must agree between an index and the embeddings used to query it
LINEAGE_MATCH_KEYS = ("checkpoint_sha256", "leads")
# lineage fields that must agree between an index and the feature set that `update` adds from
UPDATE_MATCH_KEYS = ("checkpoint_sha256", "leads", "precision", "normalize", "store_uuid", "dim")
META_FORMAT = "ecgplat-faiss-index/2"
INDEX_SUFFIX = ".faiss"
TRAILER_MAGIC = b"ECGPIDX2"  # last 8 bytes of an index file
_TRAILER = struct.Struct("<Q8s")  # description length in bytes, magic


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
    for key in LINEAGE_MATCH_KEYS:
        a, b = index_lineage.get(key), query_lineage.get(key)
        if key in index_lineage and a != b:
            raise LineageError(
                f"query embeddings have {key}={_short(b)} but the index was built "
                f"with {key}={_short(a)}; re-embed with the index's checkpoint/leads "
                f"or rebuild the index"
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


def _make_index(kind: str, dim: int, vectors: np.ndarray, params: dict, seed: int) -> faiss.Index:
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
        train = vectors
        # FAISS wants >= 39 per list; more only costs time. `max_train` caps the k-means sample
        # (e.g. 50-100k rows for a 1M gallery, where 64 per list would be a slow training run).
        max_train = int(params.get("max_train", 64 * int(params["nlist"])))
        if len(train) > max_train:
            rows = np.random.default_rng(seed).choice(len(train), max_train, replace=False)
            train = vectors[np.sort(rows)]
        index.train(train)
        index.nprobe = int(params["nprobe"])
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    index.add(vectors)
    return index


@dataclass
class GalleryIndex:
    """A FAISS index plus what its rows are and where their embeddings came from."""

    index: faiss.Index
    kind: str
    ids: list[str]
    labels: list[str] | None = None
    lineage: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    _gpu_index: object = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

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
        """(scores (Q, k) float32 cosine, rows (Q, k) int64 gallery rows, -1 = none), best first."""
        check_lineage(self.lineage, lineage)
        q = _unit_float32(queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"query embeddings have dim {q.shape[1]}, the index has {self.dim}")
        k = max(1, min(int(k), len(self)))
        scores, rows = self._searcher().search(q, k)
        return scores, rows.astype(np.int64)

    def add(self, vectors: np.ndarray, ids: list[str], labels: list[str] | None = None) -> None:
        """Append rows (normalised here) named `ids` to the index, without a rebuild."""
        x = _unit_float32(vectors)
        if x.shape[1] != self.dim or len(ids) != len(x):
            raise ValueError(f"{len(x)} vectors of dim {x.shape[1]} and {len(ids)} ids to add")
        self.index.add(x)
        self.ids = list(self.ids) + list(ids)
        if self.labels is not None:
            self.labels = list(self.labels) + list(labels or [""] * len(ids))
        self._gpu_index = None  # a GPU copy would miss the new rows

    def save(self, path: str | Path) -> Path:
        """Write the index and its description as one file, replaced atomically (a reader or
        a crash sees the old index or the new one, never a mix); returns its path."""
        index_path = index_file(path)
        index_path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": META_FORMAT,
            "kind": self.kind,
            "dim": self.dim,
            "count": len(self),
            "ids": list(self.ids),
            "labels": None if self.labels is None else list(self.labels),
            "lineage": self.lineage,
            "info": self.info,
        }
        description = json.dumps(meta).encode()
        atomic.remove_temps(index_path.parent, index_path.name)  # of killed builds
        with atomic.atomic_path(index_path) as tmp, open(tmp, "wb") as f:
            writer = faiss.PyCallbackIOWriter(f.write)
            faiss.write_index(self.index, writer)
            del writer
            f.write(description)
            f.write(_TRAILER.pack(len(description), TRAILER_MAGIC))
            f.flush()
            stop_point("index.before_replace")
        return index_path

    def drop_rows(self, rows) -> None:
        """Remove gallery rows (e.g. of forgotten records) in place: the kept vectors are added,
        in order, to an emptied clone of the index (trained state and parameters kept), so
        row numbers stay 0..n-1 for every kind (HNSW has no removal of its own)."""
        drop = np.zeros(len(self), dtype=bool)
        drop[np.asarray(list(rows), dtype=np.int64)] = True
        if not drop.any():
            return
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
        self.index, self._gpu_index = index, None
        self.ids = [self.ids[i] for i in keep]
        self.labels = None if self.labels is None else [self.labels[i] for i in keep]

    @classmethod
    def load(cls, path: str | Path, check_store: bool = True) -> GalleryIndex:
        """Read an index file; FileNotFoundError / ValueError (one line naming the file) when
        it is missing or not an ecgplat index, StaleIndexError when its store has forgotten
        records since (``check_store=False``: for ``ecgplat forget`` itself)."""
        index_path = index_file(path)
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path}: index file not found")
        with open(index_path, "rb") as f:  # one open file: one version, even during a rebuild
            meta, n_index = _read_description(f, index_path)
            f.seek(0)
            index = _read_faiss(f, n_index, index_path)
        if index.ntotal != meta["count"] or index.d != meta["dim"]:
            raise ValueError(
                f"{index_path}: {index.ntotal} vectors of dim {index.d} do not match "
                f"its description ({meta['count']} ids, dim {meta['dim']})"
            )
        if check_store:
            check_forget_generation(meta.get("lineage") or {}, index_path)
        return cls(
            index=index,
            kind=meta["kind"],
            ids=meta["ids"],
            labels=meta.get("labels"),
            lineage=meta.get("lineage") or {},
            info=meta.get("info") or {},
        )


def _read_description(f, where: Path) -> tuple[dict, int]:
    """(description, length of the FAISS part) of an open index file; ValueError if it is
    not an ecgplat index file or its description is malformed."""
    size = os.fstat(f.fileno()).st_size
    if size < _TRAILER.size:
        raise ValueError(f"{where}: not an ecgplat index file ({size} bytes)")
    f.seek(size - _TRAILER.size)
    n_meta, magic = _TRAILER.unpack(f.read(_TRAILER.size))
    if magic != TRAILER_MAGIC or n_meta > size - _TRAILER.size:
        raise ValueError(
            f"{where}: not an ecgplat index file (no description trailer; "
            "rebuild it with `ecgplat index build`)"
        )
    n_index = size - _TRAILER.size - n_meta
    f.seek(n_index)
    try:
        meta = json.loads(f.read(n_meta))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: corrupt index description ({e})") from None
    _check_description(meta, where)
    return meta, n_index


def _check_description(meta, where: Path) -> None:
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: corrupt index description (not a JSON object)")
    if meta.get("format") != META_FORMAT:
        raise ValueError(f"{where}: not an ecgplat index (format {meta.get('format')!r})")
    for key in ("count", "dim"):
        if type(meta.get(key)) is not int or meta[key] < 0:
            raise ValueError(f"{where}: corrupt index description ({key}={meta.get(key)!r})")
    if meta.get("kind") not in INDEX_KINDS:
        raise ValueError(f"{where}: corrupt index description (kind={meta.get('kind')!r})")
    for key in ("ids", "labels"):
        rows = meta.get(key)
        if (rows is not None or key == "ids") and (
            not isinstance(rows, list) or len(rows) != meta["count"]
        ):
            raise ValueError(
                f"{where}: corrupt index description ({key} is not a list of {meta['count']})"
            )


def _read_faiss(f, n_bytes: int, where: Path) -> faiss.Index:
    """The FAISS index in the first ``n_bytes`` of the open file ``f``; ValueError if FAISS
    cannot read it (truncated, random bytes, another format)."""
    left = [n_bytes]

    def read(n: int) -> bytes:
        data = f.read(min(n, left[0]))
        left[0] -= len(data)
        return data

    try:
        return faiss.read_index(faiss.PyCallbackIOReader(read))
    except (RuntimeError, MemoryError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        reason = reason.split(": ", 1)[-1] if " at /" in reason else reason
        raise ValueError(f"{where}: not a readable FAISS index ({reason[:120]})") from None


def index_file(path: str | Path) -> Path:
    """The index file for `X` or `X.faiss`: `X.faiss`."""
    p = Path(path)
    return p if p.suffix == INDEX_SUFFIX else p.with_name(p.name + INDEX_SUFFIX)


def recall_at_1(approx: faiss.Index, exact: faiss.Index, queries: np.ndarray) -> float:
    """Fraction of queries whose approximate top-1 row equals the exact top-1 row."""
    q = _unit_float32(queries)
    _, a = approx.search(q, 1)
    _, e = exact.search(q, 1)
    return float((a[:, 0] == e[:, 0]).mean())


def build_index(
    vectors: np.ndarray,
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

    For approximate kinds, recall@1 against exact search is measured on up to `n_sample` rows of
    `sample_queries` (e.g. probe embeddings); without them, on noisy copies of gallery rows.
    `n_sample=0` skips that measurement (and the exact index it needs: one more gallery-size
    buffer). `copy=False` indexes `vectors` as given, without the normalised float32 working
    copy; they must then already be a C-contiguous float32 matrix of unit rows (checked), as for
    a very large gallery whose extra copies would not fit in memory.
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    x = _unit_float32(vectors) if copy else _checked_unit_float32(vectors)
    if len(x) == 0:
        raise ValueError("cannot build an index over an empty gallery")
    if len(ids) != len(x) or (labels is not None and len(labels) != len(x)):
        raise ValueError(
            f"{len(x)} vectors but {len(ids)} ids"
            + ("" if labels is None else f" and {len(labels)} labels")
        )
    p = {**default_params(kind, len(x)), **(params or {})}
    index = _make_index(kind, x.shape[1], x, p, seed)
    info: dict = {"params": p}
    if kind != "flat" and n_sample > 0:
        rng = np.random.default_rng(seed)
        if sample_queries is None or len(sample_queries) == 0:
            rows = rng.choice(len(x), min(n_sample, len(x)), replace=False)
            sample = x[rows] + rng.normal(0, 0.5 / math.sqrt(x.shape[1]), (len(rows), x.shape[1]))
            info["recall_sample"] = "noisy gallery rows"
        else:
            sq = np.asarray(sample_queries, dtype=np.float32)
            sample = sq[rng.choice(len(sq), min(n_sample, len(sq)), replace=False)]
            info["recall_sample"] = "given queries"
        exact = faiss.IndexFlatIP(x.shape[1])
        exact.add(x)
        info["recall_at_1"] = recall_at_1(index, exact, sample)
        info["recall_n"] = len(sample)
    return GalleryIndex(
        index=index, kind=kind, ids=list(ids), labels=labels, lineage=dict(lineage or {}), info=info
    )


def _selection(store_path, features: str, split: str, level: str):
    """(features, rows of them in `split`, ident split of each row, row ids, patient labels,
    the store's forget generation as read before the rows) of a stored feature set."""
    from ecgplat.store import open_store
    from retrieval.embed import load_features

    store = open_store(store_path)
    feats = load_features(store_path, features, level)
    frame = store.records
    ident = frame["ident_split"].to_numpy()[feats.record_index]
    take = np.ones(len(ident), bool) if split == "all" else ident == split
    keys = frame["record_key"].to_numpy()[feats.record_index[take]]
    ids = (
        list(keys)
        if level == "record"
        else [f"{k}#{int(s)}" for k, s in zip(keys, feats.segment_number[take], strict=True)]
    )
    labels = list(frame["patient_key"].to_numpy()[feats.record_index[take]])
    return feats, take, ident, ids, labels, store.forget_generation


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
    feats, take, ident, ids, labels, generation = _selection(store_path, features, split, level)
    if not take.any():
        raise ValueError(
            f"{store_path}: no records in ident split {split!r} "
            "(run `ecgplat split --ident`, or use --split all)"
        )
    probes = feats.embeddings[ident == "probe"] if split != "probe" else None
    lineage = {k: v for k, v in feats.lineage.items() if k != "config"}
    lineage.update(
        {
            "features": features,
            "level": level,
            "split": split,
            "store": str(Path(store_path).resolve()),
            "forget_generation": generation,
        }
    )
    return build_index(
        feats.embeddings[take],
        ids,
        lineage=lineage,
        kind=kind,
        labels=labels,
        sample_queries=probes,
        params=params,
    )


def update_from_features(index: GalleryIndex, store_path: str | os.PathLike, features: str) -> int:
    """Add to `index` the rows of feature set `features` in the index's split selection that it
    does not hold yet (records embedded since it was built), in feature order, without a
    rebuild; returns how many. Ids, labels and lineage are kept (the lineage's counts follow the
    feature set). StaleIndexError when the store has forgotten records since the index was built
    or last passed to `ecgplat forget --index`; LineageError when the set's embeddings are of
    another lineage; ValueError when rows of the index are no longer in the selection
    (re-split records: rebuild).
    An `ivf` index assigns the new rows to its existing lists (no retraining); `flat` ends up
    equal to a build over the same rows.
    """
    lineage = index.lineage
    level, split = lineage.get("level", "record"), lineage.get("split", "gallery")
    feats, take, _, ids, labels, generation = _selection(store_path, features, split, level)
    have_generation = int(lineage.get("forget_generation", 0))
    if have_generation != generation:  # it may still hold rows of forgotten records
        raise StaleIndexError(
            f"{store_path}: the index was built before `ecgplat forget` withdrew records (forget "
            f"generation {have_generation}, store at {generation}); rebuild it with `ecgplat "
            "index build` or pass it to `ecgplat forget --index` first"
        )
    for key in UPDATE_MATCH_KEYS:
        a, b = lineage.get(key), feats.lineage.get(key)
        if key in lineage and a != b:
            raise LineageError(
                f"{store_path}: feature set {features!r} has {key}={_short(b)} but the index "
                f"was built with {key}={_short(a)}; rebuild the index"
            )
    have = set(index.ids)
    gone = len(have - set(ids))
    if gone:
        raise ValueError(
            f"{store_path}: {gone} rows of the index are no longer in the {split!r} selection "
            f"of feature set {features!r}; rebuild the index"
        )
    new = np.array([i for i, name in enumerate(ids) if name not in have], dtype=np.int64)
    if len(new):
        index.add(feats.embeddings[take][new], [ids[i] for i in new], [labels[i] for i in new])
    counts = ("n_records", "n_segments", "n_record_rows", "features")
    index.lineage = {**lineage, **{k: feats.lineage[k] for k in counts if k in feats.lineage}}
    index.lineage["features"] = features
    index.lineage["forget_generation"] = generation
    index.info["updates"] = int(index.info.get("updates", 0)) + 1
    return len(new)
