"""Single-writer locks: an exclusive, non-blocking advisory flock on a lock file, taken by every
writer of a store, of a shard directory and of an index file (readers never lock), and its
equivalent on object storage, a lock object created by a conditional put (`ObjectLock`)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class StoreBusyError(RuntimeError):
    """Another process holds the writer lock of a store, a shard directory or an index."""


class WriterLock:
    """Holds ``lock_file`` exclusively until ``release()`` (or the end of a ``with`` block);
    StoreBusyError(``busy``) at once when another process holds it."""

    def __init__(self, lock_file: str | os.PathLike, busy: str):
        self.file = Path(lock_file)
        self._fd: int | None = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise StoreBusyError(busy) from None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ObjectLock:
    """The single-writer lock of a folder on object storage (``URL/.lock``, e.g. a shard export
    on S3): a lock object created only if none exists (S3's conditional put, ``If-None-Match``),
    holding its owner's host, process id and start time, deleted by ``release()``.

    StoreBusyError(``busy``, naming the owner) when another writer holds it. A lock object left
    by a killed writer on this host (its process is gone) is taken over; one left by another
    host is refused until it is deleted by hand (its owner cannot be checked from here). The
    takeover runs under a local flock, so two writers on this host never both take it."""

    def __init__(self, url: str, busy: str):
        import fsspec

        self.url = f"{url.rstrip('/')}/{LOCK_NAME}"
        self.fs, self.key = fsspec.core.url_to_fs(self.url)
        self._held = False
        with _host_lock(self.url):
            if not self._create():
                owner = self._owner()
                if not _is_dead_here(owner):
                    who = f"{owner.get('host', '?')} pid {owner.get('pid', '?')}"
                    raise StoreBusyError(
                        f"{busy} ({who} since {owner.get('started', '?')}; lock object "
                        f"{self.url}: delete it if that writer is gone)"
                    )
                self.fs.rm_file(self.key)  # its writer was killed: take the lock over
                if not self._create():
                    raise StoreBusyError(f"{busy} (lock object {self.url})")
        self._held = True

    def _create(self) -> bool:
        import datetime as _dt
        import json
        import socket

        owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        try:
            self.fs.pipe_file(self.key, json.dumps(owner).encode(), mode="create")
        except FileExistsError:
            return False
        return True

    def _owner(self) -> dict:
        import json

        try:
            owner = json.loads(self.fs.cat_file(self.key))
        except (FileNotFoundError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def release(self) -> None:
        if self._held:
            self.fs.rm_file(self.key)
            self._held = False

    def __enter__(self) -> ObjectLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


LOCK_NAME = ".lock"


def _is_dead_here(owner: dict) -> bool:
    """Whether the lock ``owner`` ran on this host and its process is gone."""
    import socket

    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _host_lock(url: str) -> WriterLock:
    """A local flock that serialises this host's writers of the lock object ``url``."""
    import hashlib
    import tempfile

    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    file = Path(tempfile.gettempdir()) / f"ecgplat-{os.getuid()}-{digest}.lock"
    return WriterLock(file, f"{url}: being taken by another process on this host")
