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
* every data file of a header that fails the readers' own checks made before a sample is read
  (rate and duration by ``check_length``; a header without a signal length gets the length its
  data files' sizes give, by ``check_data_sizes``): sizes only, as above. So a header declaring
  hours of samples costs the driver a ``stat``, not the data file;
* a missing file: nothing is sent (the reader reports it missing).

Where shipped files exist: on the worker, while its task runs, in a folder
``sent-<pid>-<random>/`` below ``sent_parent()`` (``ecgplat-sent-<uid>`` in the temporary
folder, ``TMPDIR``; private to the user), removed when the task ends. A worker killed
mid-task cannot remove it: such orphans (their lock is free: the owner is gone) are removed by
``sweep_orphans`` at the start of the next send-bytes task on that machine and, on every worker
and the driver, at the end of the ingest.

``record_payload`` reads a record's files from a ``FileTree``: ``LocalTree`` here, a bucket's
objects in ``ingestion.bucket_files`` (whose workers fetch records themselves and lay them out
with ``process_laid_out``, in the same folders and sweep).

Workers must import ``ingestion`` (the package on their ``PYTHONPATH``); nothing else of the
driver's machine is needed. The task then carries the batch's bytes (``batch_size`` records):
the driver holds at most ``max_in_flight`` batches of them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, cast

from ecgplat.locks import StoreBusyError, WriterLock
from ingestion.readers.options import ReadOptions, check_length, inside_src, sibling
from ingestion.readers.record import RecordError
from ingestion.readers.wfdb_header import (
    MAX_HEADER_BYTES,
    check_data_sizes,
    expected_data_sizes,
    parse_header,
)
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
        tree = LocalTree(self.root)
        for rel in rels:
            payload.update(record_payload(tree, rel, opts))
        return payload

    def task(self, corpus: str, rels: list[str], seq: int, secret: bytes, opts) -> tuple:
        """(function, arguments) of the Dask task of ``rels``: the files go with it."""
        return process_sent_batch, (corpus, self.read(rels, opts), rels, seq, secret, opts)


class RecordFile(Protocol):
    """A file ``record_payload`` may send: a local ``Path``, or an object in a bucket
    (``ingestion.bucket_files``); ``read_bytes`` reads at most the size ``stat`` gave."""

    def stat(self) -> os.stat_result: ...

    def read_bytes(self) -> bytes: ...


class FileTree(Protocol):
    """Where ``record_payload`` finds a record's files, under the readers' path policy:
    ``header`` and ``data`` raise ``RecordError`` for a refused file, whose payload entry (or
    None: nothing is sent) ``refused`` gives."""

    def header(self, rel: str, opts: ReadOptions | None) -> RecordFile: ...

    def data(self, rel: str, name: str, opts: ReadOptions | None) -> RecordFile: ...

    def refused(self, rel_file: str) -> tuple[str, str] | None: ...


class LocalTree:
    """The files of a local SRC (``FileTree``): a refused symbolic link is sent as a link."""

    def __init__(self, root: Path):
        self.root = root

    def header(self, rel: str, opts: ReadOptions | None) -> Path:
        return inside_src(self.root, f"{rel}.hea", rel, opts)

    def data(self, rel: str, name: str, opts: ReadOptions | None) -> Path:
        return sibling(self.root, rel, name, rel, opts)

    def refused(self, rel_file: str) -> tuple[str, str] | None:
        node = self.root / rel_file
        return ("link", os.readlink(node)) if node.is_symlink() else None


def _within_bounds(tree: FileTree, rel: str, hdr: dict, opts: ReadOptions | None) -> bool:
    """Whether the header passes the readers' checks made before a sample is read: the rate and
    the duration (``check_length``), from the header's signal length or, where it gives none,
    from the data files' sizes (``check_data_sizes``). A header that fails them is refused by
    the reader from the header and the files' sizes alone: its data files need not be read."""
    try:
        sig_len = hdr["sig_len"]
        if sig_len is None:
            names = {s["file"] for s in hdr["signals"]}
            files = {n: tree.data(rel, n, opts) for n in names}
            sig_len = check_data_sizes(hdr, cast(dict[str, Path], files), rel)  # only .stat()
        check_length(rel, hdr["fs"], sig_len, opts)
    except (RecordError, OSError):
        return False
    return True


def _data_files(hdr: dict) -> list[tuple[str, int | None, int | None]]:
    """(name, expected size, largest size read) of the data files a header names."""
    out: list[tuple[str, int | None, int | None]] = []
    for name, expected in expected_data_sizes(hdr).items():
        if name.lower().endswith(".mat"):  # MATLAB v4: refused unread above this size
            cap = hdr["n_sig"] * (hdr["sig_len"] or 0) * 8 + _MAT_SLACK
            out.append((name, None, cap if hdr["sig_len"] else None))
        else:
            out.append((name, expected, None))
    return out


def _entry(
    tree: FileTree, rel_file: str, path_of, expected: int | None, cap: int | None, sized=False
):
    """(relative path, payload entry) of one file, or None when nothing is to be sent; only its
    size when ``sized``, or when the size is not the ``expected`` one or above ``cap``."""
    try:
        path = path_of()
    except RecordError:
        link = tree.refused(rel_file)
        return None if link is None else (rel_file, link)
    try:
        size = path.stat().st_size
    except OSError:
        return None
    if sized or (expected is not None and size != expected) or (cap is not None and size > cap):
        return rel_file, ("size", size)
    try:
        return rel_file, path.read_bytes()
    except OSError:
        return None


def record_payload(tree: FileTree, rel: str, opts: ReadOptions | None) -> dict[str, object]:
    """Relative file path -> payload entry of record ``rel``'s files in ``tree``: the header
    first, then (as the module docstring says) the data files it names, or only their sizes."""
    out: dict[str, object] = {}
    hea = _entry(tree, f"{rel}.hea", lambda: tree.header(rel, opts), None, MAX_HEADER_BYTES)
    if hea is None:
        return out
    out[hea[0]] = hea[1]
    if not isinstance(hea[1], bytes):
        return out
    try:
        hdr = parse_header(hea[1].decode("utf-8", errors="replace"), rel)
    except RecordError:
        return out  # the reader refuses the header alone
    sized = not _within_bounds(tree, rel, hdr, opts)
    folder = os.path.dirname(rel)
    for name, expected, cap in _data_files(hdr):
        if os.path.isabs(name) or name.startswith("~"):
            continue
        rel_file = os.path.normpath(f"{folder}/{name}" if folder else name)
        if rel_file.startswith(".."):
            continue
        path_of = lambda n=name: tree.data(rel, n, opts)  # noqa: E731
        got = _entry(tree, rel_file, path_of, expected, cap, sized)
        if got is not None:
            out[got[0]] = got[1]
    return out


def materialise(root: Path, payload: dict[str, object]) -> None:
    """Lay out ``payload`` (``record_payload``) below ``root``: bytes, links, sparse sizes."""
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


FOLDER_PREFIX = "sent-"  # sent-<pid>-<random>: one task's shipped files
_LOCK = "lock"  # beside the laid-out files (in src/), held while the task runs


def sent_parent() -> Path:
    """The folder of this user's shipped-record folders: ``ecgplat-sent-<uid>`` in the
    temporary folder, created private (0700); RuntimeError if it is not a folder of this user."""
    parent = Path(tempfile.gettempdir()) / f"ecgplat-sent-{os.getuid()}"
    parent.mkdir(mode=0o700, exist_ok=True)
    st = parent.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise RuntimeError(f"{parent}: not a folder of this user (remove it)")
    return parent


@contextlib.contextmanager
def record_folder() -> Iterator[Path]:
    """A fresh folder for one task's files (``src/`` of ``sent-<pid>-<random>`` under
    ``sent_parent()``), locked while in use and removed after."""
    folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=sent_parent()))
    lock = WriterLock(folder / _LOCK, "in use")
    try:
        (folder / "src").mkdir()
        yield folder / "src"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        lock.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _orphaned(folder: Path) -> bool:
    """Whether ``folder``'s owner is gone: its lock is free, or (before the owner took it) the
    pid in its name is not running."""
    if not (folder / _LOCK).exists():
        try:
            return not _alive(int(folder.name.split("-")[1]))
        except (IndexError, ValueError):
            return False  # not one of ours
    try:
        WriterLock(folder / _LOCK, "in use").release()
    except (StoreBusyError, OSError):
        return False
    return True


def sweep_orphans() -> int:
    """Remove the shipped-record folders of processes that died holding them (a worker killed
    mid-task); returns how many. Folders of running tasks are left alone."""
    removed = 0
    for folder in sent_parent().glob(f"{FOLDER_PREFIX}*"):
        if folder.is_dir() and not folder.is_symlink() and _orphaned(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def sweep_all(client) -> None:
    """``sweep_orphans`` on every worker of the Dask ``client`` (when not None) and here: the
    end of a send-bytes ingest. Never raises: a failed sweep is repeated by the next one."""
    if client is not None:
        with contextlib.suppress(Exception):
            client.run(sweep_orphans)
    with contextlib.suppress(OSError, RuntimeError):
        sweep_orphans()


def process_laid_out(corpus, lay_out: Callable[[Path], None], rels, seq, secret, opts=None):
    """``ingestion.worker.process_batch`` over the files ``lay_out(folder)`` writes into a
    ``record_folder`` (worker side); orphans of killed tasks are swept first."""
    sweep_orphans()
    with record_folder() as tmp:
        lay_out(tmp)
        return process_batch(corpus, str(tmp), rels, seq, secret, opts)


def process_sent_batch(corpus, payload, rels, seq, secret, opts=None):
    """``process_laid_out`` of the files of ``payload``, shipped in the task."""
    return process_laid_out(corpus, lambda tmp: materialise(tmp, payload), rels, seq, secret, opts)
