"""The ingest pipeline: Dask workers read and condition batches of records, the driver appends
them to the store in listing order and commits after each batch.

Memory stays flat in the number of records: at most ``max_in_flight`` batches are submitted or
waiting to be appended at any time, and the driver never holds the corpus. Because batches are
appended strictly in listing order and each record's conversion is deterministic, a run that is
killed and re-run produces the same store as one uninterrupted run; records already stored or
rejected for the source are skipped, so re-running a finished ingest adds nothing.

``workers=0`` runs everything synchronously in-process (no cluster): used by test fixtures and
for debugging. What a task runs on its worker is ``ingestion.worker.process_batch`` (or, with
``--send-bytes``, ``ingestion.sent_files.process_sent_batch``; for a bucket URL as SRC,
``ingestion.bucket_files.process_bucket_batch``).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ecgplat.progress import ProgressBar
from ecgplat.store import is_url, reason_kind
from ecgplat.store.writer import RecordBatch, StoreWriter, pack_batch, path_hash
from ingestion.bucket_files import BucketSource
from ingestion.readers.options import ReadOptions
from ingestion.readers.protocol import Reader, check_corpus, check_reader_options
from ingestion.readers.registry import get_reader
from ingestion.readers.units import NOT_VOLTAGE
from ingestion.sent_files import SEND_BYTES_CORPORA, SentSource, sweep_all
from ingestion.worker import process_batch, reject_row, warm_up

if TYPE_CHECKING:
    from distributed import Client, LocalCluster

DEFAULT_BATCH_SIZE = 128
# commits are at least this many times their own duration apart (each writes every small array
# through zarr and fsyncs): at most ~1/COMMIT_PACE of the run goes to committing, even where a
# commit is slow (a loaded disk), while a fast commit still happens every ``commit_interval``
COMMIT_PACE = 10.0


WORKER_DIED = "worker died"


def merge_batches(seq: int, batches: list[RecordBatch]) -> RecordBatch:
    """One batch (numbered ``seq``) holding the records and rejects of ``batches`` in order."""
    cols = {k: np.concatenate([b.columns[k] for b in batches]) for k in batches[0].columns}
    return RecordBatch(
        seq,
        [c for b in batches for c in b.chunks],
        cols,
        [r for b in batches for r in b.rejects],
        sum(b.bytes_read for b in batches),
    )


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc only). The driver allocates and frees a batch of
    arrays per task; without this, malloc arenas keep growing by fragmentation."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _batches(todo: list[str], batch_size: int):
    for seq, start in enumerate(range(0, len(todo), batch_size)):
        yield seq, todo[start : start + batch_size]


def _task(corpus, src, rels, seq, secret, opts) -> tuple:
    """(function, arguments) of the task for ``rels``: ``src`` is the path workers read, a
    ``SentSource`` whose files the driver reads and ships (``ingestion.sent_files``) or a
    ``BucketSource`` workers fetch from (``ingestion.bucket_files``)."""
    if isinstance(src, SentSource | BucketSource):
        return src.task(corpus, rels, seq, secret, opts)
    return process_batch, (corpus, src, rels, seq, secret, opts)


def _driver_reject(reader: Reader, src, rel: str, reason: str, secret: bytes, opts) -> tuple:
    """The reject row of ``rel`` made here, redacted as a worker would (``reject_row``)."""
    if isinstance(src, BucketSource):
        return src.reject_row(reader, rel, reason, secret, opts)
    return reject_row(reader, Path(src), rel, reason, secret, opts)


def _task_source(bucket: BucketSource | None, root: Path, send_bytes: bool, on_cluster: bool):
    """What tasks read records from: the bucket, the driver's files (send-bytes) or SRC's path
    (absolute on a cluster)."""
    if bucket is not None:
        return bucket
    if send_bytes:
        return SentSource(root.resolve())
    return str(root.resolve()) if on_cluster else str(root)


def _local_listing(reader: Reader, corpus: str, src: Path, send_bytes: bool, listing):
    """``listing``, or the reader's listing of the local folder ``src`` after its checks."""
    if not src.exists():
        raise FileNotFoundError(f"{src}: source directory does not exist")
    if send_bytes and corpus not in SEND_BYTES_CORPORA:
        raise ValueError(
            f"--send-bytes reads {', '.join(SEND_BYTES_CORPORA)} records, not {corpus!r}"
        )
    if listing is None:  # the reader's own listing: its folder must be its corpus
        listing = reader.list_records(src)
        check_corpus(reader, src, listing)  # before anything is stored
    return listing


def _run_local(corpus, src, batches, secret, sink, opts=None) -> None:
    for seq, rels in batches:
        fn, args = _task(corpus, src, rels, seq, secret, opts)
        sink(fn(*args))


def _task_key(corpus: str, seq) -> str:
    return f"ingest-{corpus}-{seq}-{os.getpid()}-{time.monotonic_ns()}"


def _single(client, corpus, src, rel, tag, secret, opts):
    fn, args = _task(corpus, src, [rel], 0, secret, opts)
    return client.submit(fn, *args, pure=False, key=_task_key(corpus, tag))


def _retry_one_by_one(client, corpus, src, rels, seq, secret, opts) -> RecordBatch:
    """A batch whose task failed (a worker died on it): run each record as its own task, so a
    record that kills its worker becomes the reject "worker died" and costs only itself. A
    record whose task fails is tried once more on its own (it may only have shared a worker
    with the culprit) before it is blamed."""
    futures = [
        _single(client, corpus, src, rel, f"{seq}-{i}", secret, opts) for i, rel in enumerate(rels)
    ]
    reader, parts = get_reader(corpus), []
    for i, (rel, future) in enumerate(zip(rels, futures, strict=True)):
        for attempt in (1, 2):
            try:
                parts.append(future.result())
                break
            except Exception as e:  # noqa: BLE001 - KilledWorker, or the task itself failed
                future.release()
                if attempt == 1:
                    future = _single(client, corpus, src, rel, f"{seq}-{i}-again", secret, opts)
                    continue
                reason = (
                    WORKER_DIED
                    if type(e).__name__ == "KilledWorker"
                    else f"unexpected {type(e).__name__} while processing the record"
                )
                row = _driver_reject(reader, src, rel, reason, secret, opts)
                parts.append(pack_batch(seq, [], [row], secret))
        future.release()
    return merge_batches(seq, parts)


def unit_rejects(writer: StoreWriter, corpus: str, listing: list[str]) -> set[str]:
    """Paths of ``listing`` rejected earlier only for their non-voltage unit: an ingest with
    ``--units`` reads them again (their old reject rows stay, as the history of that run)."""
    from ecgplat.store import as_str_array, zarr_array

    n = writer.n_rejects
    if n == 0:
        return set()
    root = writer.root
    reasons = as_str_array(zarr_array(root, "rejects/reason")[:n])
    sources = as_str_array(zarr_array(root, "rejects/source")[:n])
    hashes = as_str_array(zarr_array(root, "rejects/path_hash")[:n])
    marked = (sources == corpus) & np.char.startswith(reasons.astype(str), NOT_VOLTAGE)
    stored = set(as_str_array(zarr_array(root, "records/path_hash")[: writer.n_records]).tolist())
    wanted = set(hashes[marked].tolist()) - stored
    secret = writer.secret
    return {rel for rel in listing if path_hash(corpus, rel, secret) in wanted}


def _run_dask(client, corpus, src, batches, secret, sink, max_in_flight: int, opts=None) -> None:
    """Bounded ``client.submit`` + ``as_completed``; results re-ordered by sequence number."""
    from distributed import as_completed

    pending = as_completed()
    waiting: dict[int, RecordBatch] = {}
    next_seq = 0
    submitted: dict[str, tuple[int, list[str]]] = {}
    batches = iter(batches)
    in_flight = 0

    def submit_one() -> bool:
        item = next(batches, None)
        if item is None:
            return False
        seq, rels = item
        fn, args = _task(corpus, src, rels, seq, secret, opts)
        future = client.submit(fn, *args, pure=False, key=_task_key(corpus, seq))
        submitted[future.key] = (seq, rels)
        pending.add(future)
        return True

    while in_flight + len(waiting) < max_in_flight and submit_one():
        in_flight += 1
    for future in pending:
        seq, rels = submitted.pop(future.key)
        try:
            batch = future.result()
        except Exception:  # noqa: BLE001 - the batch's worker died (or the task failed)
            batch = _retry_one_by_one(client, corpus, src, rels, seq, secret, opts)
        future.release()
        in_flight -= 1
        waiting[batch.seq] = batch
        while next_seq in waiting:
            sink(waiting.pop(next_seq))
            next_seq += 1
        while in_flight + len(waiting) < max_in_flight and submit_one():
            in_flight += 1


def ingest(
    corpus: str,
    src: str | os.PathLike,
    store: str | os.PathLike,
    workers: int | None = None,
    scheduler: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    max_in_flight: int | None = None,
    limit: int | None = None,
    commit_interval: float = 1.0,
    opts: ReadOptions | None = None,
    send_bytes: bool = False,
    listing: list[str] | None = None,
) -> dict:
    """Ingest the records of ``corpus`` under ``src`` into ``store`` (created if missing).

    ``workers``: Dask worker processes of a LocalCluster (default: one per CPU core); 0 = run
    synchronously in this process. ``scheduler``: address of an existing cluster
    (``tcp://host:port``), overrides ``workers``. ``limit``: ingest at most this many new records.
    ``commit_interval``: seconds between commits (0 = after every batch), stretched to
    ``COMMIT_PACE`` times the last commit's duration when commits are slow; a killed run loses
    at most the batches since the last commit. ``opts``: rate range, maximum duration, path
    policy and reader fields (``units``; ``fs``/``leads``/``patients`` of user arrays) of the
    readers (``ingestion.readers.options.ReadOptions``; default: its defaults), checked against the
    corpus reader's ``OPTIONS`` before anything runs (ValueError). A batch
    whose Dask worker dies is retried record by record; the record that kills its worker is
    rejected as "worker died". ``send_bytes``: the driver reads each record's files and ships
    them in the task, so workers need not see ``src`` (``ingestion.sent_files``); otherwise
    workers read ``src`` (its absolute path) themselves: a shared filesystem. ``src`` may be an
    fsspec URL (``s3://bucket/prefix/``, corpora ``bucket_files.BUCKET_CORPORA``; not with
    ``send_bytes``): every worker then fetches its records with its own credentials.
    ``listing``: the record paths to ingest instead of the reader's ``list_records(src)`` (the
    auto ingest's files of one detected format, ``ingestion.auto``).
    Returns a summary: records, segments, patients (added by this run), rejected (by reason),
    skipped (already present), seconds, records_per_s, bytes_read, startup_seconds (Dask
    cluster start, included in seconds), and the store totals.
    """
    reader = get_reader(corpus)
    opts = check_reader_options(reader, opts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bucket, root = None, Path(src)
    if is_url(src):  # object storage: every worker fetches its records (ingestion.bucket_files)
        bucket = BucketSource(corpus, os.fspath(src), send_bytes)
        listing = bucket.listing(reader) if listing is None else listing
    else:
        listing = _local_listing(reader, corpus, root, send_bytes, listing)
    sweep = send_bytes or bucket is not None  # workers lay out record files: sweep at the end
    t0 = time.perf_counter()
    with StoreWriter(store) as writer:
        done = writer.done_paths(corpus, listing)
        if opts.units:
            done -= unit_rejects(writer, corpus, listing)
        todo = [rel for rel in listing if rel not in done]
        skipped = len(listing) - len(todo)
        if limit is not None:
            todo = todo[:limit]
        keys = writer.record_keys()
        stats = {
            "records": 0,
            "segments": 0,
            "bytes_read": 0,
            "startup_seconds": 0.0,
        }
        patients: set[str] = set()
        rejected: Counter = Counter()
        bar = ProgressBar(progress, len(todo), f"ingest {corpus}")

        last_commit = [time.monotonic(), 0.0]  # when the last commit ended, what it took

        def sink(batch: RecordBatch) -> None:
            added = writer.append(batch, known_keys=keys)
            since = time.monotonic() - last_commit[0]
            if commit_interval <= 0 or since >= max(commit_interval, COMMIT_PACE * last_commit[1]):
                t_commit = time.monotonic()
                writer.commit()
                _trim_heap()
                last_commit[:] = [time.monotonic(), time.monotonic() - t_commit]
            stats["records"] += added["records"]
            stats["segments"] += added["segments"]
            stats["bytes_read"] += batch.bytes_read
            patients.update(added["patient_keys"])
            rejected.update(reason_kind(r) for r in added["reject_reasons"])
            bar.advance(batch.n_records + len(batch.rejects))

        batches = _batches(todo, batch_size)
        try:
            if todo and workers == 0 and scheduler is None:
                local_src = _task_source(bucket, root, send_bytes, on_cluster=False)
                _run_local(corpus, local_src, batches, writer.secret, sink, opts)
            elif todo:
                t_cluster = time.perf_counter()
                with _dask_client(workers, scheduler) as client:
                    stats["startup_seconds"] = time.perf_counter() - t_cluster
                    n_workers = max(1, len(client.scheduler_info()["workers"]))
                    limit_in_flight = max_in_flight or 2 * n_workers + 1
                    try:
                        _run_dask(
                            client,
                            corpus,
                            _task_source(bucket, root, send_bytes, on_cluster=True),
                            batches,
                            writer.secret,
                            sink,
                            limit_in_flight,
                            opts,
                        )
                    finally:
                        if sweep:  # the files of workers killed mid-task, on every worker
                            sweep_all(client)
        finally:
            if sweep:
                sweep_all(None)
            bar.close()
            writer.commit()  # whatever was appended is complete: make it visible
        totals = {
            "store_records": writer.n_records,
            "store_segments": writer.n_segments,
            "store_rejects": writer.n_rejects,
        }
    seconds = time.perf_counter() - t0
    return {
        "corpus": corpus,
        "store": str(store),
        "listed": len(listing),
        "skipped": skipped,
        "records": stats["records"],
        "segments": stats["segments"],
        "patients": len(patients),
        "rejected": dict(sorted(rejected.items())),
        "seconds": round(seconds, 3),
        "records_per_s": round(stats["records"] / seconds, 1) if seconds > 0 else 0.0,
        "bytes_read": stats["bytes_read"],
        "startup_seconds": round(stats["startup_seconds"], 3),
        **totals,
    }


# Worker processes: one thread each, no native thread pools on top (2 workers on 2 cores must
# not oversubscribe), and glibc malloc left to reuse freed memory. Dask's default
# MALLOC_TRIM_THRESHOLD_=65536 also pins the mmap threshold at 128 KiB: every ~0.5 MB array of
# a record is then mmap'ed, page-faulted and unmapped again (measured: 1.6 s of system time per
# 2,000 records in one worker, 0.4 s without). Peak memory stays bounded by the batch size.
_WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "BLOSC_NTHREADS": "1",
    "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
}
_WORKER_CONFIG = {
    "distributed.nanny.pre-spawn-environ": _WORKER_ENV,
    # the workers' 10 ms stack-sampling profiler and frequent system/memory polling only cost CPU
    "distributed.worker.profile.enabled": False,
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.scheduler.work-stealing": False,  # equal tasks, in order: nothing to steal
    # a task that kills its worker twice is given up (KilledWorker) and retried record by record
    "distributed.scheduler.allowed-failures": 1,
}


class _dask_client:
    """Context manager: a Client on ``scheduler`` or on a fresh LocalCluster of ``workers``."""

    def __init__(self, workers: int | None, scheduler: str | None):
        self.workers, self.scheduler = workers, scheduler
        self.cluster: LocalCluster | None = None
        self.client: Client | None = None

    def __enter__(self):
        import dask
        from distributed import Client, LocalCluster

        if self.scheduler:
            self.client = Client(self.scheduler)
        else:
            n = self.workers or os.cpu_count() or 1
            # no dashboard (bokeh is not installed); ":0" rather than None because the
            # scheduler's HTTP server otherwise tries port 8787 and warns when it is taken.
            with dask.config.set(_WORKER_CONFIG):
                self.cluster = LocalCluster(
                    n_workers=n,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=":0",
                    env=dict(_WORKER_ENV),
                )
            self.client = Client(self.cluster)
        self.client.run(warm_up)
        return self.client

    def __exit__(self, *exc):
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
