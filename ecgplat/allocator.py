"""The command line's one allocator setting: few glibc malloc arenas, so that memory freed by
worker threads is reused instead of kept.

glibc gives a thread that allocates while another holds an arena an arena of its own (up to
8 per core) and keeps what is freed in an arena for that arena. zarr decodes chunks in its own
threads, so a command that reads a large store part by part held the sum of several arenas'
high-water marks: memory that grew with the number of parts read, not with what was still in
use. Two arenas (the main thread's and one shared by the others) keep that flat. A
`MALLOC_ARENA_MAX` already set in the environment (read by glibc itself) is left alone, and on
other C libraries nothing is done.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

ARENA_ENV = "MALLOC_ARENA_MAX"
CLI_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt parameter number (glibc's malloc.h)


def limit_arenas(n: int = CLI_ARENAS) -> bool:
    """Cap this process's glibc malloc arenas at `n` (best called before threads start);
    whether the cap was set."""
    if os.environ.get(ARENA_ENV):
        return False
    libc = _glibc()
    if libc is None:
        return False  # not glibc: M_ARENA_MAX means nothing there
    return libc.mallopt(_M_ARENA_MAX, int(n)) == 1


def release_free_memory() -> None:
    """Give the pages of freed heap memory back to the system (glibc's `malloc_trim`), wherever
    they lie in the heap. A loop that allocates and frees large, varying temporaries (glibc
    serves them from the heap once a freed one has raised its mmap threshold) otherwise keeps
    the sum of its fragments resident. No-op off glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    """The C library this process runs on when it is glibc (its symbols are the process's own
    on Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "malloc_trim") else None
