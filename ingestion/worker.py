"""The worker side of an ingest: read and condition a batch of records into a ``RecordBatch``.

``process_batch`` runs in a Dask worker (or in-process with ``workers=0``, and in ``watch``);
every failure becomes a reject row (``reject_row``), redacted like a stored record. The driver
side (ordering, committing, retries) is ``ingestion.pipeline``; the send-bytes variant that
first lays out the shipped files is ``ingestion.sent_files.process_sent_batch``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ecgplat import faults
from ecgplat.store.writer import RecordBatch, pack_batch, path_hash, patient_key_for, redact
from ingestion.conditioning import condition
from ingestion.readers.options import ReadOptions
from ingestion.readers.protocol import Reader, open_record, patient_hint
from ingestion.readers.record import RECORD_SUFFIXES, RecordError
from ingestion.readers.registry import get_reader

SRC_NOT_VISIBLE = "source folder not visible on this worker (share it, or ingest with --send-bytes)"


def _file_bytes(src: Path, rel: str) -> int:
    """Bytes of a record's header and signal files (for throughput reports)."""
    total = 0
    for suffix in RECORD_SUFFIXES:
        with contextlib.suppress(OSError):
            total += os.stat(f"{src / rel}{suffix}").st_size
    return total


def reject_row(
    reader: Reader,
    root: Path,
    rel: str,
    reason: str,
    secret: bytes,
    opts: ReadOptions | None = None,
) -> tuple:
    """(source, path, reason, path_hash) of a rejected record. Path and reason get the same
    redaction as a stored record_id: the raw patient id (when the reader can tell it without
    reading the signal) is replaced by its pseudonym; the hash is of the raw listed path."""
    source = reader.SOURCE
    try:
        raw = patient_hint(reader, root, rel, opts)
    except Exception:  # noqa: BLE001 - a hint only
        raw = None
    key = patient_key_for(raw, f"{source}/{rel}", secret)
    return (source, redact(rel, raw, key), redact(reason, raw, key), path_hash(source, rel, secret))


def process_batch(
    corpus: str,
    src: str,
    rels: list[str],
    seq: int,
    secret: bytes,
    opts: ReadOptions | None = None,
) -> RecordBatch:
    """Read and condition ``rels`` (worker side); every failure becomes a reject, never raises.
    Reasons are the readers' fixed templates; an unexpected exception contributes its type only
    (its text may quote field values such as patient ids)."""
    reader = get_reader(corpus)
    root = Path(src)
    good, rejects, nbytes = [], [], 0
    if not root.exists():  # a worker without the driver's filesystem (SRC may be one file)
        rows = [reject_row(reader, root, rel, SRC_NOT_VISIBLE, secret, opts) for rel in rels]
        return pack_batch(seq, [], rows, secret)
    for rel in rels:
        faults.worker_crash_point(rel)
        try:
            good.append(condition(open_record(reader, root, rel, opts), opts))
        except RecordError as e:
            rejects.append(reject_row(reader, root, rel, e.reason, secret, opts))
        except MemoryError:
            reason = "out of memory reading the record"
            rejects.append(reject_row(reader, root, rel, reason, secret, opts))
        except Exception as e:  # noqa: BLE001 - a reader bug must not stop the job either
            reason = f"unexpected {type(e).__name__} while reading the record"
            rejects.append(reject_row(reader, root, rel, reason, secret, opts))
        nbytes += _file_bytes(root, rel)
    return pack_batch(seq, good, rejects, secret, nbytes)


def warm_up() -> None:
    """Import the reader, conditioning and codec code in a fresh worker process (run once per
    worker as part of the cluster start, rather than inside its first task)."""
    import numcodecs  # noqa: F401

    from ecgplat.store.segment_codec import segment_codecs

    segment_codecs()
