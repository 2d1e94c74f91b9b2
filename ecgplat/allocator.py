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
import ctypes.util
import os
import sys

ARENA_ENV = "MALLOC_ARENA_MAX"
CLI_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt parameter number (glibc's malloc.h)


def limit_arenas(n: int = CLI_ARENAS) -> bool:
    """Cap this process's glibc malloc arenas at `n` (best called before threads start);
    whether the cap was set."""
    if os.environ.get(ARENA_ENV) or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # not glibc: M_ARENA_MAX means nothing there
    return libc.mallopt(_M_ARENA_MAX, int(n)) == 1
