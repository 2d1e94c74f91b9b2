"""Streaming ingestion: follow a folder and ingest each WFDB record once its files are complete.

A record (``NAME.hea`` plus the data files its header names) is ready when

* every data file holds exactly the bytes the header implies (``.dat`` formats by
  ``ingestion.readers.wfdb_header.expected_data_sizes``; a CinC 2021 ``.mat`` as a MATLAB v4 int16
  ``val`` matrix): it is ingested at the next poll;
* or, when the header cannot tell (unparsable header, compressed format, a file larger than
  implied), its files' sizes and modification times are unchanged across two polls;
* a record whose data file is missing or shorter than its header implies is still being
  written: it waits until its files have not changed for ``settle`` seconds, then goes to the
  reader (which rejects it with the reason, e.g. truncated).

Ready records are read and conditioned in this process, appended and committed (the store's
writer lock is held only for that), then ``publish()`` makes them queryable (embedding, index).
What is done is told by the store itself (``path_hash`` of stored and rejected records), so a
restarted watch skips it. ``stop`` (set by a signal handler) is checked between records: the
current record is finished, committed and published before ``run`` returns.

Latency of a record: from its landing (the newest modification time among its files when it
was found ready) to the end of ``publish()``. Records are named by their store key, whose
patient part is pseudonymised like every stored record (never the raw file name); a rejected
one as the store's rejects table names it (``<source>/<path>``, redacted the same way). Every
event line goes to ``echo`` with its control characters escaped (``ecgplat.printable``): a file
name holding a newline cannot split or forge an event.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ecgplat.printable import one_line
from ecgplat.store import StoreBusyError
from ecgplat.store.writer import StoreWriter
from ingestion.readers.options import ReadOptions
from ingestion.readers.protocol import check_reader_options
from ingestion.readers.record import RecordError
from ingestion.readers.registry import get_reader
from ingestion.readers.wfdb_header import MAX_HEADER_BYTES, expected_data_sizes, parse_header
from ingestion.worker import process_batch

WATCH_CORPORA = ("wfdb", "cinc2021")  # one record = NAME.hea + the data files it names
DEFAULT_POLL = 1.0  # seconds between scans of SRC
DEFAULT_SETTLE = 30.0  # seconds an incomplete record must stay unchanged before it is read
_MAT4_VAL_HEADER = 20 + len("val\0")  # MATLAB v4 matrix header (5 int32) + variable name


@dataclass
class _Seen:
    signature: tuple
    since: float  # monotonic time this signature was first seen
    polls: int = 1  # consecutive scans that saw this signature


@dataclass
class WatchReport:
    """What a watch run did: per-record latencies (by store key) and rejects (redacted)."""

    latencies: dict[str, float] = field(default_factory=dict)
    rejects: list[tuple[str, str]] = field(default_factory=list)  # (redacted path, reason)
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> dict:
        lat = np.array(list(self.latencies.values()), dtype=float)
        return {
            "seconds": round(time.monotonic() - self.started, 3),
            "ingested": len(self.latencies),
            "rejected": len(self.rejects),
            "latency_median_s": round(float(np.median(lat)), 3) if len(lat) else None,
            "latency_p95_s": round(float(np.percentile(lat, 95)), 3) if len(lat) else None,
            "latencies_s": {k: round(v, 3) for k, v in self.latencies.items()},
            "rejects": [{"path": p, "reason": r} for p, r in self.rejects],
        }


def _expected_sizes(text: str, rel: str) -> dict[str, int | None] | None:
    """Data file name -> expected bytes (None: unknown) of a header text; None if unparsable."""
    try:
        hdr = parse_header(text, rel)
    except RecordError:
        return None
    sizes = expected_data_sizes(hdr)
    for name in sizes:
        if name.lower().endswith(".mat"):
            n = hdr["n_sig"] * (hdr["sig_len"] or 0)
            sizes[name] = _MAT4_VAL_HEADER + 2 * n if hdr["sig_len"] else None
    return sizes


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return -1, 0
    return st.st_size, st.st_mtime_ns


def scan_record(src: Path, rel: str) -> tuple[tuple, str, float]:
    """(signature, state, landing) of one listed record: the signature is every file's (name,
    size, mtime); state is "complete", "short" (a data file missing or shorter than its header
    implies) or "unknown"; landing the newest mtime (epoch seconds)."""
    hea = src / f"{rel}.hea"
    files = [(hea.name, *_stat(hea))]
    sizes = None
    if 0 <= files[0][1] <= MAX_HEADER_BYTES:
        try:
            sizes = _expected_sizes(hea.read_bytes().decode("utf-8", errors="replace"), rel)
        except OSError:
            sizes = None
    state = "unknown" if not sizes else "complete"
    for name, expected in (sizes or {}).items():
        if "/" in name or name in ("", "~", ".", ".."):
            state = "unknown"  # the reader refuses or resolves these; no guessing here
            continue
        size, mtime = _stat(hea.parent / name)
        files.append((name, size, mtime))
        if size < 0 or (expected is not None and size < expected):
            state = "short"
        elif state == "complete" and (expected is None or size != expected):
            state = "unknown"
    landing = max(m for _, _, m in files) / 1e9
    return tuple(files), state, landing


class Watcher:
    """Polls ``src`` and ingests ready records of ``corpus`` into ``store``; see the module."""

    def __init__(
        self,
        corpus: str,
        src: str | os.PathLike,
        store: str | os.PathLike,
        publish: Callable[[], None] | None = None,
        poll: float = DEFAULT_POLL,
        settle: float = DEFAULT_SETTLE,
        opts: ReadOptions | None = None,
        echo: Callable[[str], None] = print,
    ):
        if corpus not in WATCH_CORPORA:
            raise ValueError(f"watch follows {', '.join(WATCH_CORPORA)} folders, not {corpus!r}")
        if not poll > 0 or not settle >= 0:
            raise ValueError(f"poll must be > 0 and settle >= 0 seconds, got {poll}, {settle}")
        self.corpus, self.module = corpus, get_reader(corpus)
        self.opts = check_reader_options(self.module, opts)
        self.src, self.store = Path(src), Path(store)
        if not self.src.is_dir():
            raise FileNotFoundError(f"{self.src}: source directory does not exist")
        self.publish = publish or (lambda: None)
        self.poll, self.settle = poll, settle
        self.echo = lambda line: echo(one_line(line))  # a file name may hold a newline
        self.report = WatchReport()
        self._seen: dict[str, _Seen] = {}
        self._done: set[str] = set()
        self._seq = 0

    # ---- scanning ---------------------------------------------------------------------------
    def _ready(self, now: float) -> list[tuple[str, float]]:
        """(rel, landing) of the listed records that are ready, in listing order."""
        listing = [r for r in self.module.list_records(self.src) if r not in self._done]
        ready = []
        for rel in listing:
            sig, state, landing = scan_record(self.src, rel)
            seen = self._seen.get(rel)
            if seen is None or seen.signature != sig:
                seen = self._seen[rel] = _Seen(sig, now)
            else:
                seen.polls += 1
            if (
                state == "complete"
                or (state == "unknown" and seen.polls >= 2)
                or (state == "short" and now - seen.since >= self.settle)
            ):
                ready.append((rel, landing))
        for gone in set(self._seen) - set(listing):
            del self._seen[gone]
        return ready

    # ---- ingesting --------------------------------------------------------------------------
    def _ingest(self, ready: list[tuple[str, float]], stop: threading.Event) -> dict[str, float]:
        """Read, append and commit ``ready`` (one at a time, stopping early when ``stop`` is
        set); returns store key -> landing of the records added."""
        added: dict[str, float] = {}
        with StoreWriter(self.store) as writer:
            done = writer.done_paths(self.corpus, [rel for rel, _ in ready])
            self._done |= done
            keys = writer.record_keys()
            for rel, landing in ready:
                if rel in done:
                    continue
                batch = process_batch(
                    self.corpus, str(self.src), [rel], self._seq, writer.secret, self.opts
                )
                self._seq += 1
                writer.append(batch, known_keys=keys)
                self._done.add(rel)
                self._seen.pop(rel, None)
                for key in batch.columns["record_key"]:
                    added[str(key)] = landing
                for source, path, reason, _ in batch.rejects:
                    self.report.rejects.append((path, reason))
                    self.echo(f"rejected {source}/{path}: {reason}")
                if stop.is_set():
                    break
            writer.commit()
        return added

    def catch_up(self) -> None:
        """Create the store if needed, learn what it holds and publish what is not yet."""
        with StoreWriter(self.store) as writer:
            self._done = writer.done_paths(self.corpus, self.module.list_records(self.src))
            has_records = writer.n_records > 0
        if has_records:
            self.publish()

    def step(self, stop: threading.Event) -> int:
        """One scan: ingest and publish what is ready; returns the number of records added."""
        try:
            ready = self._ready(time.monotonic())
        except OSError as e:  # a folder vanished while it was listed: look again next poll
            self.echo(f"waiting: cannot list {self.src} ({e.strerror or type(e).__name__})")
            return 0
        if not ready:
            return 0
        try:
            added = self._ingest(ready, stop)
        except StoreBusyError as e:  # another writer (ingest, split, embed): try next poll
            self.echo(f"waiting: {e}")
            return 0
        if added:
            self.publish()
            now = time.time()
            for key, landing in added.items():
                latency = max(0.0, now - landing)
                self.report.latencies[key] = latency
                self.echo(f"queryable {key} {latency:.2f} s after landing")
        return len(added)

    def run(self, stop: threading.Event, max_seconds: float | None = None) -> dict:
        """Poll until ``stop`` is set (or ``max_seconds`` pass); returns the report summary."""
        end = None if max_seconds is None else time.monotonic() + max_seconds
        while not stop.is_set() and (end is None or time.monotonic() < end):
            self.step(stop)
            stop.wait(self.poll)
        return self.report.summary()
