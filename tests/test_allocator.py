"""The allocator settings of `ecgplat.allocator`: the command line's malloc-arena cap (memory
freed by one worker thread is reused by the next instead of being kept in an arena per thread;
a user's own MALLOC_ARENA_MAX wins; every command applies it) and `release_free_memory` (freed
heap pages below a live block go back to the system)."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

import ecgplat.cli.apps as apps
from ecgplat.allocator import ARENA_ENV
from ecgplat.cli import app

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="the arena cap is glibc's",
)

THREADS, MB = 6, 16
# each thread in turn allocates MB in 4 KB blocks (malloc, not Python's small-object pool) and
# frees them, with one live block above them so that nothing is trimmed; then the growth of RSS
_SCRIPT = textwrap.dedent(
    f"""
    import sys, threading
    from ecgplat.allocator import limit_arenas
    applied = limit_arenas(2) if sys.argv[1] == "cap" else False
    turn = [threading.Event() for _ in range({THREADS} + 1)]
    keep = []
    def work(i):
        turn[i].wait()
        blocks = [bytearray(4096) for _ in range({MB} * 256)]
        keep.append(bytearray(4096))
        del blocks
        turn[i + 1].set()
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    threads = [threading.Thread(target=work, args=(i,)) for i in range({THREADS})]
    for t in threads:
        t.start()
    before = rss_mb()
    turn[0].set()
    turn[{THREADS}].wait()
    print(applied, rss_mb() - before)
    for t in threads:
        t.join()
    """
)


def _run(mode: str, **env) -> tuple[bool, float]:
    environ = {k: v for k, v in os.environ.items() if k != ARENA_ENV} | env
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, env=environ
    )
    assert out.returncode == 0, out.stderr
    applied, grown = out.stdout.split()
    return applied == "True", float(grown)


@glibc
def test_capped_arenas_reuse_what_other_threads_freed():
    capped_applied, capped = _run("cap")
    _, uncapped = _run("none")
    assert capped_applied
    # one arena per thread keeps each thread's peak; two arenas keep about two of them
    assert uncapped >= (THREADS - 1) * MB
    assert capped <= 2.5 * MB
    applied, _ = _run("cap", **{ARENA_ENV: "4"})  # the user's setting is left to glibc
    assert not applied


def test_every_command_applies_the_cap(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(apps, "limit_arenas", lambda: calls.append(1) or True)
    result = CliRunner().invoke(app, ["info", str(tmp_path / "missing")])
    assert result.exit_code != 0 and calls == [1]


_TRIM = textwrap.dedent(
    """
    import numpy as np
    from ecgplat.allocator import release_free_memory
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    big = np.ones((8 << 20) // 8)  # mmapped; freeing it raises glibc's mmap threshold to 8 MB
    del big
    blocks = [np.ones((1 << 20) // 8) for _ in range(64)]  # 1 MB each, now from the heap
    last = blocks.pop()  # kept: the freed blocks below it cannot be trimmed from the top
    del blocks
    before = rss_mb()
    if sys.argv[1] == "trim":
        release_free_memory()
    print(before - rss_mb())
    """
)


@glibc
def test_release_free_memory_returns_freed_heap_pages():
    freed = {}
    for mode in ("trim", "keep"):
        out = subprocess.run(
            [sys.executable, "-c", "import sys\n" + _TRIM, mode], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        freed[mode] = float(out.stdout)
    assert freed["keep"] < 8 and freed["trim"] >= 48  # of the 63 MB freed below the live block
