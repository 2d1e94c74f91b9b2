"""Embeddings of every stored ECG, written into the feature store incrementally with their lineage.

`embed_store(store, checkpoint, name, leads)` runs the checkpoint's encoder (any kind:
pretrain, diagnosis, identify, imported) over the committed segments of the store and writes
the feature set `STORE/features/<name>/` (segment- and record-level embeddings plus their
lineage; layout in docs/formats.md, "Feature sets").

An embedding is the L2-normalised time-mean of the encoder output (the identification embedding of
docs/method.md §6.1) computed with the leads outside `leads` zero-filled, under the resolved
`precision` (fp32 | bf16, recorded in the lineage).

The store's segments, in record order, are cut into fixed batches: batch k is always segments
[k*B, (k+1)*B) (B = the set's `batch_size`, recorded in the lineage). A segment's embedding is
thus computed in the same batch with the same neighbours however the work is split, so an
append, a resumed run and a run over several `torchrun` ranks give the same bits as one full
run (the forward of a batch is deterministic; which batch a segment lands in is what could change
the floating-point kernels). Work is committed every `commit_segments` segments: the rows are
written first, then the lineage's counts (`n_segments`, `n_records`, `n_record_rows`) are
replaced atomically; readers use only the committed rows. When the store has grown, or a run was
killed, the next run restarts at the batch holding the first uncommitted segment and re-embeds
only that batch's committed part. A record's row is written once all its segments are. Each
segment is read from the store once; under `zscore` a batch reads the whole records it touches,
whose per-record statistics then come from the rows already read.

A new set (or an `overwrite`) is built under `features/.build-<name>` and renamed into place when
complete, so an interrupted first embed never shows a half set under its name, and an
interrupted overwrite keeps the old set; the next run with the same lineage resumes it. Growth is
appended in place. The run holds the store's writer lock. Another checkpoint (by SHA-256), lead
set, precision or normalisation under an existing name needs `overwrite=True`. Under `torchrun`
the batches of each commit are dealt round-robin to the ranks; rank 0 gathers and writes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ecgplat.atomic import fsync_dir
from ecgplat.faults import stop_at_count
from ecgplat.store import FEATURES_DIR as FEATURES
from ecgplat.store import N_LEADS, SEGMENT_SAMPLES, StoreLock

SCHEMA = "ecgplat-features/1"
LEVELS = ("segment", "record")
BUILD_PREFIX = ".build-"
CHUNK_ROWS = 4096  # rows per zarr chunk of a feature array
COMMIT_SEGMENTS = 4096  # segments between two commits (rounded up to whole batches)
# lineage fields that must agree for rows to be appended to an existing set
MODEL_KEYS = ("checkpoint_sha256", "leads", "precision", "normalize")


class FeatureError(ValueError):
    """A feature set that cannot be written or read; the message names the store and the reason."""


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def lead_names(leads) -> str:
    """Canonical comma-joined lead names of a lead spec ("12", "I,II,V2", ...)."""
    from ecgplat.leads import LEADS, parse_leads

    return ",".join(LEADS[i] for i in parse_leads(leads))


def feature_dir(store_path: str | os.PathLike, name: str) -> Path:
    if not name or name.startswith(".") or "/" in name or name in LEVELS:
        raise FeatureError(f"{store_path}: bad feature set name {name!r}")
    return Path(store_path) / FEATURES / name


def _dir_lineage(path: Path) -> dict | None:
    import json

    meta = path / "zarr.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("attributes", {}).get("lineage")


def read_lineage(store_path: str | os.PathLike, name: str) -> dict | None:
    """The lineage of a complete feature set, or None when there is none under that name."""
    lineage = _dir_lineage(feature_dir(store_path, name))
    return lineage if lineage and lineage.get("complete") else None


def list_features(store_path: str | os.PathLike) -> list[str]:
    root = Path(store_path) / FEATURES
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if not p.name.startswith(".") and read_lineage(store_path, p.name)
    )


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
    forgotten records, with the embeddings left on disk until read."""
    import zarr

    if level not in LEVELS:
        raise FeatureError(f"unknown feature level {level!r}; choose segment or record")
    lineage = read_lineage(store_path, name)
    if lineage is None:
        have = ", ".join(list_features(store_path)) or "none"
        raise FeatureError(
            f"{store_path}: no feature set {name!r} (have: {have}); run `ecgplat embed` first"
        )
    from ecgplat.store import read_forgotten

    group = zarr.open_group(str(feature_dir(store_path, name) / level), mode="r")
    n = lineage.get("n_segments" if level == "segment" else "n_record_rows")
    n = int(group["record_index"].shape[0]) if n is None else int(n)  # sets of before appends
    record_index = np.asarray(group["record_index"][:n], dtype=np.int64)
    forgotten = read_forgotten(store_path)["records"]
    live = ~np.isin(record_index, forgotten) if len(forgotten) else None
    keep = None if live is None or live.all() else np.flatnonzero(live)  # None: every row
    if keep is not None:
        record_index = record_index[keep]
    return StoredFeatures(group, n, keep, record_index, lineage, level)


def load_features(store_path: str | os.PathLike, name: str, level: str = "record") -> Features:
    """The committed rows of a feature set at `level` (segment | record), read into memory."""
    return open_features(store_path, name, level).load()


# ------------------------------------------------------------------------------ the plan


@dataclass
class _Order:
    """The store's segments in record order: feature row p is segment `rows[p]` of the store."""

    rows: np.ndarray  # int64 store segment rows
    record: np.ndarray  # int64 record index of each
    number: np.ndarray  # int64 segment number inside its record
    record_end: np.ndarray  # int64 (R,) feature row after each record's last segment

    @classmethod
    def of(cls, store) -> _Order:
        # two int columns, not the record table (its string columns cost O(records) Python work)
        starts = np.asarray(store.column("seg_start"), dtype=np.int64)
        counts = np.asarray(store.column("seg_count"), dtype=np.int64)
        ends = np.cumsum(counts)
        number = np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - counts, counts)
        return cls(
            np.repeat(starts, counts) + number,
            np.repeat(np.arange(len(counts), dtype=np.int64), counts),
            number,
            ends,
        )

    def records_covered(self, n_segments: int) -> int:
        """Number of leading records all of whose segments are among the first `n_segments`."""
        return int(np.searchsorted(self.record_end, n_segments, side="right"))

    def rows_of(self, r0: int, r1: int) -> tuple[int, int]:
        """Feature rows [lo, hi) of records r0 .. r1 - 1."""
        return (int(self.record_end[r0 - 1]) if r0 else 0), (
            int(self.record_end[r1 - 1]) if r1 else 0
        )

    def record_span(self, first: int, last: int) -> tuple[int, int]:
        """Feature rows [lo, hi) of the whole records holding rows `first` and `last - 1`."""
        return self.rows_of(int(self.record[first]), int(self.record[last - 1]) + 1)


def _same_model(old: dict, want: dict) -> bool:
    return all(old.get(k, "fp32" if k == "precision" else None) == want[k] for k in MODEL_KEYS[:3])


def _plan(store_path: Path, name: str, want: dict, overwrite: bool, batch_size) -> dict:
    """What to do, decided under the writer lock: {"dir", "lineage" (the committed one, or a
    fresh one for a new build), "fresh": a new build to rename into place at the end}."""
    target = feature_dir(store_path, name)
    build = store_path / FEATURES / f"{BUILD_PREFIX}{name}"
    old = read_lineage(store_path, name)
    if old is not None and not overwrite:
        if (
            not _same_model(old, want)
            or old.get("normalize", want["normalize"]) != want["normalize"]
        ):
            raise FeatureError(
                f"{store_path}: feature set {name!r} holds embeddings of checkpoint "
                f"{old.get('checkpoint_sha256', '?')[:12]} with leads "
                f"{old.get('leads')} in {old.get('precision', 'fp32')}; "
                "use another --name or --overwrite"
            )
        if (
            old.get("store_uuid") == want["store_uuid"]
            and old["n_segments"] <= len(want["order"].rows)
            and _aligned(store_path, name, old, want["order"])
        ):
            _check_batch_size(store_path, name, old, batch_size)
            if "n_record_rows" not in old:  # a set written before appends: all rows committed
                ends = want["order"].record_end[: want["order"].records_covered(old["n_segments"])]
                old = {**old, "n_record_rows": int(np.count_nonzero(np.diff(ends, prepend=0)))}
            return {"dir": target, "lineage": old, "fresh": False}
    _remove_leftovers(store_path, name)
    partial = _dir_lineage(build)
    if (
        partial is not None
        and all(partial.get(k) == want[k] for k in (*MODEL_KEYS, "store_uuid"))
        and partial.get("batch_size") == (batch_size or partial.get("batch_size"))
        and partial["n_segments"] <= len(want["order"].rows)
    ):
        return {"dir": build, "lineage": partial, "fresh": True}  # resume a killed build
    shutil.rmtree(build, ignore_errors=True)
    return {"dir": build, "lineage": None, "fresh": True}


def _aligned(store_path: Path, name: str, old: dict, order: _Order) -> bool:
    """Whether the set's rows are the store's segments in order (row = segment position). Sets
    written before appends existed may lack the rows of records forgotten before their embed;
    those are rebuilt rather than appended to."""
    import zarr

    if "n_record_rows" in old:  # written by the incremental embed: aligned by construction
        return True
    n = int(old["n_segments"])
    group = zarr.open_group(str(feature_dir(store_path, name) / "segment"), mode="r")
    rows = np.asarray(group["record_index"][:n], dtype=np.int64)
    return len(rows) == n and np.array_equal(rows, order.record[:n])


def _check_batch_size(store_path: Path, name: str, old: dict, batch_size) -> None:
    if batch_size and old.get("batch_size", batch_size) != batch_size:
        raise FeatureError(
            f"{store_path}: feature set {name!r} was embedded in batches of "
            f"{old['batch_size']}; appending in batches of {batch_size} would not give the same "
            "embeddings (drop --batch-size or use --overwrite)"
        )


def _remove_leftovers(store_path: Path, name: str) -> None:
    for tmp in (store_path / FEATURES).glob(f".tmp-{name}-*"):
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ writing


def _create(path: Path, lineage: dict, dim: int) -> None:
    """An empty feature set (complete=False) at `path`."""
    import zarr

    group = zarr.open_group(str(path), mode="w")
    columns = {
        "segment": (("embedding", np.float32, dim), ("record_index", np.int64, 0)),
        "record": (("embedding", np.float32, dim), ("record_index", np.int64, 0)),
    }
    columns["segment"] += (("segment_number", np.int32, 0),)
    for level, arrays in columns.items():
        sub = group.create_group(level)
        for key, dtype, width in arrays:
            shape = (0, width) if width else (0,)
            chunks = (CHUNK_ROWS, width) if width else (CHUNK_ROWS,)
            sub.create_array(key, shape=shape, dtype=dtype, chunks=chunks)
    group.attrs["lineage"] = lineage


def _put_rows(group, start: int, arrays: dict) -> None:
    for key, value in arrays.items():
        arr = group[key]
        end = start + len(value)
        if arr.shape[0] != end:
            arr.resize((end, *arr.shape[1:]))
        if len(value):
            arr[start:end] = value


def _commit(path: Path, lineage: dict, seg: tuple, order: _Order, done: int) -> dict:
    """Write segment rows past the committed counts, then the rows of the records they complete
    (means of the set's segment rows, `done` = the committed segment count before), then the
    lineage that commits both (one atomic replacement of the group's zarr.json); returns it."""
    import zarr

    from training.models.identifier import record_means

    group = zarr.open_group(str(path), mode="r+")
    start, arrays = seg
    stop = start + len(arrays["record_index"])
    _put_rows(group["segment"], start, arrays)
    r0, r1 = order.records_covered(done), order.records_covered(stop)
    lo, hi = order.rows_of(r0, r1)
    emb = np.asarray(group["segment"]["embedding"][lo:hi], dtype=np.float32)
    rec_ids, rec_emb = record_means(emb, order.record[lo:hi])
    rows = int(lineage.get("n_record_rows", 0))
    _put_rows(group["record"], rows, {"embedding": rec_emb, "record_index": rec_ids})
    lineage = {
        **lineage,
        "n_segments": stop,
        "n_records": r1,
        "n_record_rows": rows + len(rec_ids),
    }
    group.attrs["lineage"] = lineage  # last: the commit point
    return lineage


def _publish_build(store_path: Path, name: str, build: Path) -> None:
    target = feature_dir(store_path, name)
    if target.exists():  # overwrite: move the old set aside first, then swap in the new one
        trash = store_path / FEATURES / f".tmp-{name}-old-{uuid.uuid4().hex[:8]}"
        os.replace(target, trash)
        os.replace(build, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(build, target)
    fsync_dir(store_path / FEATURES)


# ------------------------------------------------------------------------------ embedding


class _Segments:
    """The run's segments (float32 mV) by feature row, each read from the store once.

    `rows(start, stop)` returns a batch's rows. With `whole_records` (zscore: a record's
    statistics need all of its segments) it reads the whole records the batch touches and keeps
    them: `record_stats(r)` of a record of that batch needs no second read, and the next batch
    finds the part of a record it shares with this one already read. A forgotten record's rows
    are zeros (they cannot be read); no batch uses them."""

    def __init__(self, store, order: _Order, whole_records: bool):
        self.store, self.order, self.whole_records = store, order, whole_records
        self.lo = self.hi = 0
        self.block = None

    def rows(self, start: int, stop: int) -> np.ndarray:
        lo, hi = self.order.record_span(start, stop) if self.whole_records else (start, stop)
        if self.block is not None and self.lo <= lo < self.hi <= hi:
            kept = self.block[lo - self.lo :]
            self.block = np.concatenate([kept, self._read(self.hi, hi)]) if hi > self.hi else kept
        else:
            self.block = self._read(lo, hi)
        self.lo, self.hi = lo, hi
        return self.block[start - lo : stop - lo]

    def _read(self, lo: int, hi: int) -> np.ndarray:
        live = self.store.live[self.order.record[lo:hi]]
        if live.all():
            return self.store.read_segments(self.order.rows[lo:hi])
        out = np.zeros((hi - lo, N_LEADS, SEGMENT_SAMPLES), dtype=np.float32)
        out[live] = self.store.read_segments(self.order.rows[lo:hi][live])
        return out

    def record_stats(self, record: int) -> tuple[np.ndarray, np.ndarray]:
        """`training.normalize.lead_stats` of a record of the last batch, from the rows read."""
        from training.normalize import lead_stats

        lo, hi = self.order.rows_of(record, record + 1)
        return lead_stats(self.block[lo - self.lo : hi - self.lo])


@dataclass
class _Run:
    """The moving parts of one embed run."""

    store: object
    order: _Order
    encoder: object
    leads: tuple
    normalize: str
    device: object
    precision: str
    batch_size: int
    world: int
    rank: int

    def __post_init__(self):
        # one reader for the whole run: a record cut by a commit is not read twice either
        self.segments = _Segments(self.store, self.order, whole_records=self.normalize != "none")

    def batches(self, numbers):
        """Batches `numbers` of the live segments only (a forgotten record's segments are not
        readable); `live` marks their rows in the full batch, for `_padded`."""
        from training.batch import make_batch

        masks, n, b = self.store.lead_masks, len(self.order.rows), self.batch_size
        for k in numbers:
            start, stop = k * b, min((k + 1) * b, n)
            rec = self.order.record[start:stop]
            live = self.store.live[rec]
            x = self.segments.rows(start, stop)
            yield make_batch(
                x if live.all() else x[live],
                masks[rec][live],
                rec[live],
                self.leads,
                segment_index=self.order.number[start:stop][live],
                live=live,
            )

    def embed(self, first: int, last: int) -> np.ndarray | None:
        """Embeddings of batches [first, last) in order on rank 0 (None elsewhere), zero rows
        for forgotten records (as `ecgplat forget` leaves them); the batches are dealt
        round-robin to the ranks."""
        from training.models.identifier import embed_batches
        from training.normalize import normalize_store_batches

        mine = list(range(first + self.rank, last, self.world))
        batches = normalize_store_batches(
            self.store, self.batches(mine), self.normalize, self.leads,
            stats=self.segments.record_stats,
        )  # fmt: skip
        emb = embed_batches(
            self.encoder, _padded(batches, self.leads), self.device, self.precision
        )[0]
        rows = slice(first * self.batch_size, min(last * self.batch_size, len(self.order.rows)))
        if self.world == 1:
            emb[~self.store.live[self.order.record[rows]]] = 0.0
            return emb
        import torch.distributed as dist

        sizes = [min(self.batch_size, len(self.order.rows) - k * self.batch_size) for k in mine]
        parts = np.split(emb, np.cumsum(sizes)[:-1]) if mine else []
        gathered = [None] * self.world if self.rank == 0 else None
        dist.gather_object(parts, gathered, dst=0)
        if self.rank != 0:
            return None
        by_batch = {}
        for r, got in enumerate(gathered):
            by_batch.update(zip(range(first + r, last, self.world), got, strict=True))
        emb = np.concatenate([by_batch[k] for k in range(first, last)])
        emb[~self.store.live[self.order.record[rows]]] = 0.0
        return emb


def _padded(batches, leads: tuple):
    """Full batches again from batches of their live rows: a forgotten record's rows become
    all-zero segments (with the run's leads present), so every batch keeps its fixed size and
    the live rows' neighbours are as in a run before the forget (same shapes, same kernels)."""
    import torch

    from ecgplat.leads import lead_mask

    for batch in batches:
        live = batch.pop("live")
        if bool(live.all()):
            yield batch
            continue
        out = {}
        for key, value in batch.items():
            full = value.new_zeros((len(live), *value.shape[1:]))
            if key == "lead_mask":
                full[:] = torch.from_numpy(lead_mask(leads))
            full[live] = value
            out[key] = full
        yield out


def _run_commits(run: _Run, path: Path, lineage: dict, commit_segments: int, bar) -> dict:
    """Embed from the committed counts of `lineage` to the end of the store, committing every
    `commit_segments` segments; returns the final lineage (rank 0)."""
    b, n = run.batch_size, len(run.order.rows)
    done = int(lineage["n_segments"])
    step = max(1, -(-commit_segments // b))
    n_batches = -(-n // b)
    commits = 0
    for first in range(done // b, n_batches, step):
        last = min(first + step, n_batches)
        emb = run.embed(first, last)
        if run.rank != 0:
            continue
        start, stop = first * b, min(last * b, n)
        seg = (
            start,
            {
                "embedding": emb,
                "record_index": run.order.record[start:stop],
                "segment_number": run.order.number[start:stop].astype(np.int32),
            },
        )
        lineage = _commit(path, lineage, seg, run.order, done)
        bar.advance(stop - max(done, start))
        done = stop
        commits += 1
        stop_at_count("embed.commit", commits)
    return lineage


def _decide(store_path: Path, name: str, want: dict, overwrite: bool) -> dict:
    """Rank 0's first look, without the lock: is the set already up to date?"""
    old = read_lineage(store_path, name)
    order = want["order"]
    if (
        old is not None
        and not overwrite
        and _same_model(old, want)
        and old.get("store_uuid") == want["store_uuid"]
        and old.get("n_segments") == len(order.rows)
        and old.get("n_records", len(order.record_end)) == len(order.record_end)
    ):
        return {"action": "unchanged", "lineage": old}
    return {"action": "run"}


@dataclass
class LoadedModel:
    """A checkpoint's encoder with what a feature set's lineage records of it, loaded once."""

    checkpoint: Path
    sha256: str
    kind: str
    config: dict
    normalize: str  # the data.normalize it was trained with, applied before it
    encoder: object

    @classmethod
    def load(cls, checkpoint: str | os.PathLike) -> LoadedModel:
        """CheckpointError naming the file when it is not a usable checkpoint. The file is
        read once: hashed for the lineage, then loaded from the same bytes."""
        from training.models.checkpoint_file import CheckpointError, encoder_from, load_checkpoint
        from training.normalize import mode_of

        try:
            data = Path(checkpoint).read_bytes()
        except OSError:
            raise CheckpointError(Path(checkpoint), "no such checkpoint file") from None
        sha = hashlib.sha256(data).hexdigest()
        ckpt = load_checkpoint(checkpoint, data=data)
        del data
        return cls(
            Path(checkpoint),
            sha,
            ckpt["kind"],
            ckpt.get("config") or {},
            mode_of(ckpt),
            encoder_from(ckpt, checkpoint),
        )


def embed_store(
    store_path: str | os.PathLike,
    checkpoint: str | os.PathLike,
    name: str,
    leads="12",
    overwrite: bool = False,
    batch_size: int | None = None,
    device: str = "auto",
    progress: bool = False,
    precision: str = "auto",
    commit_segments: int = COMMIT_SEGMENTS,
    model: LoadedModel | None = None,
) -> dict:
    """Embed the stored segments that `features/<name>` lacks with `checkpoint`'s encoder.

    `model`: that checkpoint already loaded (`LoadedModel.load`), for callers that embed again
    and again (`ecgplat watch`); otherwise it is loaded when there is work to do.
    `precision` auto | fp32 | bf16 (training.precision); `batch_size` None = the set's, or sized
    to the model for a new set. Under `torchrun` (WORLD_SIZE > 1) every rank calls this and the
    work is split; rank 0 writes. Returns {"status": "written" | "unchanged", "name",
    "n_segments", "n_records", "lineage", "embedded": segments computed by this run}. Raises
    FeatureError (existing set of another lineage without `overwrite`, or another batch size),
    CheckpointError (unusable checkpoint), FileNotFoundError/ValueError (not a store),
    StoreBusyError (another writer holds the store).
    """
    import torch.distributed as dist

    from training.distributed import setup, teardown

    owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    info = setup(device)
    try:
        return _embed(
            Path(store_path), checkpoint, name, leads, overwrite, batch_size, info, progress,
            precision, commit_segments, model,
        )  # fmt: skip
    finally:
        if owns_group:
            teardown()


def _share(info, make):
    """`make()` on rank 0, broadcast to the others; an exception on rank 0 is raised there and
    becomes a FeatureError with its message on the others."""
    if info.world == 1:
        return make()
    import torch.distributed as dist

    box: list = [None]
    error = None
    if info.rank == 0:
        try:
            box[0] = ("ok", make())
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others heard of it
            error = e
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0][0] == "error":
        raise FeatureError(box[0][1])
    return box[0][1]


def _embed(
    store_path, checkpoint, name, leads, overwrite, batch_size, info, progress, precision, every,
    model,
) -> dict:  # fmt: skip
    from ecgplat.leads import parse_leads
    from ecgplat.progress import ProgressBar
    from ecgplat.store import open_store
    from training.models.flops import inference_batch_size
    from training.precision import resolve_precision

    precision = resolve_precision(precision, info.device)
    store = open_store(store_path)
    feature_dir(store_path, name)  # a bad name fails before the slow part
    model = model or LoadedModel.load(checkpoint)
    want = {
        "checkpoint_sha256": model.sha256,
        "leads": lead_names(leads),
        "precision": precision,
        "store_uuid": store.attrs.get("store_uuid"),
        "order": _Order.of(store),
    }
    decision = _share(info, lambda: _decide(store_path, name, want, overwrite))
    if decision["action"] == "unchanged":
        old = decision["lineage"]
        return _result("unchanged", name, old, 0)

    encoder = model.encoder
    want["normalize"] = model.normalize  # as the encoder was trained
    encoder.to(info.device)
    locks: list[StoreLock] = []
    locked: list = []  # rank 0: the store as of its lock

    def locked_plan() -> dict:
        locks.append(StoreLock(store_path))  # held by rank 0 until the end of the run
        locked.append(open_store(store_path))  # counts as of the lock: nobody appends now
        return _locked_plan(store_path, name, {**want, "order": _Order.of(locked[0])}, overwrite,
                            batch_size)  # fmt: skip

    try:
        plan = _share(info, locked_plan)
        # under rank 0's lock nobody appends: every rank now sees the same committed store
        store = locked[0] if locked else open_store(store_path)
        want["order"] = _Order.of(store)
        size = batch_size or (plan["lineage"] or {}).get("batch_size")
        size = size or inference_batch_size(encoder.cfg)
        lineage = plan["lineage"] or {
            "schema": SCHEMA,
            "name": name,
            "checkpoint_sha256": want["checkpoint_sha256"],
            "checkpoint_kind": model.kind,
            "checkpoint": str(model.checkpoint.resolve()),
            "config": model.config,
            "leads": want["leads"],
            "precision": precision,
            "normalize": want["normalize"],
            "dim": int(encoder.embed_dim),
            "batch_size": int(size),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "store_uuid": want["store_uuid"],
            "n_records": 0,
            "n_segments": 0,
            "n_record_rows": 0,
            "complete": False,
        }
        lineage.setdefault("batch_size", int(size))  # a set written before batches were recorded
        if info.rank == 0 and plan["lineage"] is None:
            _create(plan["dir"], lineage, int(encoder.embed_dim))
        run = _Run(
            store, want["order"], encoder, parse_leads(leads), want["normalize"], info.device,
            precision, int(size), info.world, info.rank,
        )  # fmt: skip
        done = int(lineage["n_segments"])
        left = len(want["order"].rows) - done
        with ProgressBar(progress and info.rank == 0, left, f"embed {name}", transient=True) as bar:
            lineage = _run_commits(run, plan["dir"], lineage, every, bar)
        if info.rank == 0:
            lineage = _finish(store_path, name, plan, lineage)
        lineage = _share(info, lambda: lineage)
    finally:
        for lock in locks:
            lock.release()
    return _result("written", name, lineage, len(want["order"].rows) - done)


def _locked_plan(store_path: Path, name: str, want: dict, overwrite: bool, batch_size) -> dict:
    if not (store_path / FEATURES / "zarr.json").is_file():  # `features` as a zarr group
        import zarr

        zarr.open_group(str(store_path / FEATURES), mode="a")
    return _plan(store_path, name, want, overwrite, batch_size)


def _finish(store_path: Path, name: str, plan: dict, lineage: dict) -> dict:
    """Mark the set complete with the final counts (and move a new build into place)."""
    import zarr

    lineage = {**lineage, "complete": True}
    if plan["fresh"]:
        lineage["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    group = zarr.open_group(str(plan["dir"]), mode="r+")
    group.attrs["lineage"] = lineage
    if plan["fresh"]:
        _publish_build(store_path, name, plan["dir"])
    return lineage


def _result(status: str, name: str, lineage: dict, embedded: int) -> dict:
    return {
        "status": status,
        "name": name,
        "n_segments": int(lineage["n_segments"]),
        "n_records": int(lineage.get("n_record_rows", lineage["n_records"])),
        "lineage": lineage,
        "embedded": int(embedded),
    }
