"""The embedding run: every stored ECG's embedding written into a feature set incrementally
(`embed_store`, what `ecgplat embed` and `ecgplat watch` run).

`embed_store(store, checkpoint, name, leads)` runs the checkpoint's encoder (any kind:
pretrain, diagnosis, identify, imported) over the committed segments of the store and writes
the feature set `STORE/features/<name>/` (segment- and record-level embeddings plus their
lineage; format and read API in `retrieval.features`, write protocol in
`retrieval.feature_build`, layout in docs/formats.md, "Feature sets").

An embedding is the L2-normalised time-mean of the encoder output (the identification embedding of
docs/method.md §6.1) computed with the leads outside `leads` zero-filled, under the resolved
`precision` (fp32 | bf16, recorded in the lineage).

The store's segments, in record order, are cut into fixed batches: batch k is always segments
[k*B, (k+1)*B) (B = the set's `batch_size`, recorded in the lineage). A segment's embedding is
thus computed in the same batch with the same neighbours however the work is split, so an
append, a resumed run and a run over several `torchrun` ranks give the same bits as one full
run (the forward of a batch is deterministic; which batch a segment lands in is what could change
the floating-point kernels). Work is committed every `commit_segments` segments. When the store
has grown, or a run was killed, the next run restarts at the batch holding the first uncommitted
segment and re-embeds only that batch's committed part. A record's row is written once all its
segments are. Each segment is read from the store once; under `zscore` a batch reads the whole
records it touches, whose per-record statistics then come from the rows already read.

A new set (or an `overwrite`) is built aside and renamed into place when complete; the next run
with the same lineage resumes an interrupted one. Growth is appended in place. The run holds the
store's writer lock. Another checkpoint (by SHA-256), lead set, precision or normalisation under an
existing name needs `overwrite=True`. Under `torchrun` the batches of each commit are dealt
round-robin to the ranks; rank 0 gathers and writes.

A store at a URL (a published, read-only store) is read where it lies and the set written to a
local features folder (`features_out`; named `DIR/NAME` by its readers, `retrieval.features`),
under that folder's writer lock; into the URL itself nothing is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecgplat.faults import stop_at_count
from ecgplat.leads import lead_mask, parse_leads
from ecgplat.locks import WriterLock
from ecgplat.progress import ProgressBar
from ecgplat.store import N_LEADS, SEGMENT_SAMPLES, StoreLock, is_url, open_store
from retrieval.feature_build import (
    BuildPlan,
    SegmentOrder,
    SegmentRows,
    commit_rows,
    create,
    finish,
    new_lineage,
    plan_build,
    record_filters,
    unchanged_lineage,
)
from retrieval.features import FeatureError, FeatureSet, lead_names
from retrieval.lineage import Lineage
from retrieval.model import LoadedModel
from training.normalize import lead_stats, normalize_store_batches

COMMIT_SEGMENTS = 4096  # segments between two commits (rounded up to whole batches)


class _Segments:
    """The run's segments (float32 mV) by feature row, each read from the store once.

    `rows(start, stop)` returns a batch's rows. With `whole_records` (zscore: a record's
    statistics need all of its segments) it reads the whole records the batch touches and keeps
    them: `record_stats(r)` of a record of that batch needs no second read, and the next batch
    finds the part of a record it shares with this one already read. A forgotten record's rows
    are zeros (they cannot be read); no batch uses them."""

    def __init__(self, store, order: SegmentOrder, whole_records: bool):
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
        lo, hi = self.order.rows_of(record, record + 1)
        return lead_stats(self.block[lo - self.lo : hi - self.lo])


@dataclass
class _Run:
    """The moving parts of one embed run."""

    store: object
    order: SegmentOrder
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
        rows = SegmentRows(
            start,
            embedding=emb,
            record_index=run.order.record[start:stop],
            segment_number=run.order.number[start:stop].astype(np.int32),
        )
        lineage = commit_rows(path, lineage, rows, run.order, done)
        bar.advance(stop - max(done, start))
        done = stop
        commits += 1
        stop_at_count("embed.commit", commits)
    return lineage


@dataclass(frozen=True)
class EmbedRequest:
    """What `embed_store` was asked to do (its parameters, less the device)."""

    store_path: str | Path  # a URL as given, else a Path
    checkpoint: str | os.PathLike
    name: str
    features_out: str | os.PathLike | None = None  # a features folder outside the store
    leads: object = "12"
    overwrite: bool = False
    batch_size: int | None = None
    progress: bool = False
    precision: str = "auto"
    commit_segments: int = COMMIT_SEGMENTS
    model: LoadedModel | None = None


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
    features_out: str | os.PathLike | None = None,
) -> dict:
    """Embed the stored segments that `features/<name>` lacks with `checkpoint`'s encoder.

    `features_out`: write the set to `features_out/<name>` instead, outside the store (needed
    for a store at a URL, which is read-only; readers name it `features_out/<name>`).

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

    request = EmbedRequest(
        store_path=str(store_path) if is_url(store_path) else Path(store_path),
        checkpoint=checkpoint,
        name=name,
        features_out=features_out,
        leads=leads,
        overwrite=overwrite,
        batch_size=batch_size,
        progress=progress,
        precision=precision,
        commit_segments=commit_segments,
        model=model,
    )
    owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    info = setup(device)
    try:
        return _embed(request, info)
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


def _embed(req: EmbedRequest, info) -> dict:
    from training.models.flops import inference_batch_size
    from training.precision import resolve_precision

    precision = resolve_precision(req.precision, info.device)
    fs = FeatureSet(req.store_path, req.name, req.features_out)  # a bad name fails first
    if is_url(req.store_path) and fs.folder is None:
        raise FeatureError(
            f"{req.store_path}: a store at a URL is read-only; write the feature set to a local "
            "folder with --features-out DIR"
        )
    store = open_store(req.store_path)
    model = req.model or LoadedModel.load(req.checkpoint)
    want = Lineage(
        {
            "checkpoint_sha256": model.sha256,
            "leads": lead_names(req.leads),
            "precision": precision,
            "store_uuid": store.attrs.get("store_uuid"),
            "normalize": model.normalize,  # as the encoder was trained
        }
    )
    old = _share(info, lambda: unchanged_lineage(fs, want, SegmentOrder.of(store), req.overwrite))
    if old is not None:
        return _result("unchanged", req.name, old, 0)

    encoder = model.encoder
    encoder.to(info.device)
    locks: list[WriterLock] = []
    locked: list = []  # rank 0: the store as of its lock

    def locked_plan() -> BuildPlan:
        locks.extend(_writer_locks(req.store_path, fs))  # held by rank 0 until the end
        locked.append(open_store(req.store_path))  # counts as of the lock: nobody appends now
        return plan_build(fs, want, SegmentOrder.of(locked[0]), req.overwrite, req.batch_size)

    try:
        plan = _share(info, locked_plan)
        # under rank 0's lock nobody appends: every rank now sees the same committed store
        store = locked[0] if locked else open_store(req.store_path)
        order = SegmentOrder.of(store)
        size = req.batch_size or (plan.lineage or {}).get("batch_size")
        size = size or inference_batch_size(encoder.cfg)
        filters = record_filters(store)
        lineage = plan.lineage or new_lineage(fs, want, model, encoder.embed_dim, size, filters)
        lineage["filters"] = sorted(set(lineage.get("filters", ())) | set(filters))
        lineage.setdefault("batch_size", int(size))  # a set written before batches were recorded
        if info.rank == 0 and plan.lineage is None:
            create(plan.dir, lineage, int(encoder.embed_dim))
        run = _Run(
            store=store,
            order=order,
            encoder=encoder,
            leads=parse_leads(req.leads),
            normalize=want["normalize"],
            device=info.device,
            precision=precision,
            batch_size=int(size),
            world=info.world,
            rank=info.rank,
        )
        done = int(lineage["n_segments"])
        left = len(order.rows) - done
        shown = req.progress and info.rank == 0
        with ProgressBar(shown, left, f"embed {req.name}", transient=True) as bar:
            lineage = _run_commits(run, plan.dir, lineage, req.commit_segments, bar)
        if info.rank == 0:
            lineage = finish(fs, plan, lineage)
        lineage = _share(info, lambda: lineage)
    finally:
        for lock in locks:
            lock.release()
    return _result("written", req.name, lineage, len(order.rows) - done)


def _writer_locks(store_path, fs: FeatureSet) -> list[WriterLock]:
    """The locks of a run: the store's (a local store), and the features folder's when the set
    lies outside the store (a store at a URL is read-only: nobody writes it from here)."""
    locks: list[WriterLock] = []
    try:
        if not is_url(store_path):
            locks.append(StoreLock(store_path))
        if fs.folder is not None:
            fs.root.mkdir(parents=True, exist_ok=True)
            busy = f"{fs.root}: feature sets are being written by another process"
            locks.append(WriterLock(fs.root / ".lock", busy))
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks


def _result(status: str, name: str, lineage: dict, embedded: int) -> dict:
    return {
        "status": status,
        "name": name,
        "n_segments": int(lineage["n_segments"]),
        "n_records": int(lineage.get("n_record_rows", lineage["n_records"])),
        "lineage": lineage,
        "embedded": int(embedded),
    }
