"""Send-bytes mode of the Dask ingest (``--send-bytes``): the driver reads each record's files
and ships them in the task, so workers never need to see SRC.

A record's files are its header ``rel.hea`` and the data files the header names, resolved by the
readers' own path policy (``ingestion.readers.options``). On the worker,
``process_sent_batch`` lays them out in a private temporary folder exactly as under SRC and
runs the unchanged reader there, so a record gives the same segments, the same rejects and
the same reasons as when the worker reads SRC itself. What the driver does not read:

* a file the path policy refuses: a refused symbolic link is sent as a link (the worker's check
  then refuses it with the same reason); a refused path is not sent (refused there too);
* a data file whose size differs from what its header implies (the reader rejects it on its
  size alone): only the size is sent and the worker creates a sparse file of that size;
* a missing file: nothing is sent (the reader reports it missing).

Workers must import ``ingestion`` (the package on their ``PYTHONPATH``); nothing else of the
driver's machine is needed. The task then carries the batch's bytes (``batch_size`` records):
the driver holds at most ``max_in_flight`` batches of them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import cast

from ingestion.readers.options import ReadOptions, inside_src, sibling
from ingestion.readers.record import RecordError
from ingestion.readers.wfdb_header import MAX_HEADER_BYTES, expected_data_sizes, parse_header
from ingestion.worker import process_batch

SEND_BYTES_CORPORA = ("wfdb", "cinc2021", "ludb", "cpsc2021")  # record = .hea + named files
_MAT_SLACK = 4096  # cinc2021: a .mat larger than n_sig x sig_len x 8 + this is refused unread


class SentSource:
    """The driver's SRC in send-bytes mode: ``read(rels)`` gives the payload of a batch.
    ``os.fspath`` of it is the driver's path (for the driver's own rejects)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __fspath__(self) -> str:
        return str(self.root)

    def read(self, rels: list[str], opts: ReadOptions | None = None) -> dict[str, object]:
        """Relative file path -> bytes | ("size", n) | ("link", target) for ``rels``."""
        payload: dict[str, object] = {}
        for rel in rels:
            payload.update(_record_payload(self.root, rel, opts))
        return payload


def _data_files(text: str, rel: str) -> list[tuple[str, int | None, int | None]]:
    """(name, expected size, largest size read) of the data files a header names."""
    try:
        hdr = parse_header(text, rel)
    except RecordError:
        return []
    out: list[tuple[str, int | None, int | None]] = []
    for name, expected in expected_data_sizes(hdr).items():
        if name.lower().endswith(".mat"):  # MATLAB v4: refused unread above this size
            cap = hdr["n_sig"] * (hdr["sig_len"] or 0) * 8 + _MAT_SLACK
            out.append((name, None, cap if hdr["sig_len"] else None))
        else:
            out.append((name, expected, None))
    return out


def _entry(root: Path, rel_file: str, path_of, expected: int | None, cap: int | None):
    """(relative path, payload entry) of one file, or None when nothing is to be sent."""
    try:
        path = path_of()
    except RecordError:
        node = root / rel_file
        if node.is_symlink():
            return rel_file, ("link", os.readlink(node))
        return None
    try:
        size = path.stat().st_size
    except OSError:
        return None
    if (expected is not None and size != expected) or (cap is not None and size > cap):
        return rel_file, ("size", size)
    try:
        return rel_file, path.read_bytes()
    except OSError:
        return None


def _record_payload(root: Path, rel: str, opts: ReadOptions | None) -> dict[str, object]:
    out: dict[str, object] = {}
    hea = _entry(
        root,
        f"{rel}.hea",
        lambda: inside_src(root, f"{rel}.hea", rel, opts),
        None,
        MAX_HEADER_BYTES,
    )
    if hea is None:
        return out
    out[hea[0]] = hea[1]
    if not isinstance(hea[1], bytes):
        return out
    folder = os.path.dirname(rel)
    for name, expected, cap in _data_files(hea[1].decode("utf-8", errors="replace"), rel):
        if os.path.isabs(name) or name.startswith("~"):
            continue
        rel_file = os.path.normpath(f"{folder}/{name}" if folder else name)
        if rel_file.startswith(".."):
            continue
        got = _entry(root, rel_file, lambda n=name: sibling(root, rel, n, rel, opts), expected, cap)
        if got is not None:
            out[got[0]] = got[1]
    return out


def _materialise(root: Path, payload: dict[str, object]) -> None:
    for rel_file, entry in payload.items():
        path = root / rel_file
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(entry, bytes):
            path.write_bytes(entry)
            continue
        kind, value = cast(tuple[str, object], entry)
        if kind == "link":
            os.symlink(str(value), path)
        else:  # ("size", n): a sparse file of the size the reader rejects it for
            with open(path, "wb") as f:
                f.truncate(int(cast(int, value)))


def process_sent_batch(corpus, payload, rels, seq, secret, opts=None):
    """``ingestion.worker.process_batch`` over the files of ``payload`` (worker side)."""
    tmp = Path(tempfile.mkdtemp(prefix="ecgplat-sent-"))
    try:
        _materialise(tmp, payload)
        return process_batch(corpus, str(tmp), rels, seq, secret, opts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
