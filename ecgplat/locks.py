"""Single-writer locks: an exclusive, non-blocking advisory flock on a lock file, taken by every
writer of a store, of a shard directory and of an index file (readers never lock)."""

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
