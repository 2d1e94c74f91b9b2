"""What every benchmark shares: its work directory, the process-tree memory sampler and the JSON
report writer.

Scripts run as ``python bench/<name>.py`` put the repository root first on ``sys.path`` before
importing this module (``bench/retrieval.py`` would otherwise shadow the ``retrieval`` package).
"""

from __future__ import annotations

import contextlib
import json
import resource
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


@contextlib.contextmanager
def workdir(path: Path | None, prefix: str) -> Iterator[Path]:
    """``path`` (created, kept afterwards) or, when it is None, a temporary directory named
    ``prefix...`` that is removed on exit."""
    if path is None:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)
    else:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        yield path


def dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a file: its size; missing: 0)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# ---- memory ------------------------------------------------------------------------------------


def max_rss_gib() -> float:
    """This process's own RSS high-water mark (``ru_maxrss``, KiB on Linux), in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def vm_hwm(pid: int) -> int:
    """Process ``pid``'s exact RSS high-water mark in bytes (``VmHWM`` of /proc/PID/status: it
    holds the peak between samples too; unlike ``wait4``'s ru_maxrss it does not include the RSS
    of the parent that forked the process); 0 where it cannot be read."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path(f"/proc/{pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    return 0


class TreeSampler:
    """Samples, every ``interval`` seconds in a thread, the RSS of process ``pid`` (default: this
    one) and all its descendants (scheduler, nannies, workers): ``peak`` is the largest sum over
    the tree, ``peak_process`` the largest single process, ``peak_root`` the root process's own
    sampled RSS and ``hwm`` its ``VmHWM``; ``cpu`` holds the last seen user+sys CPU seconds per
    process. Use as a context manager around the work."""

    def __init__(self, pid: int | None = None, interval: float = 0.05):
        import psutil

        self.proc, self.interval = psutil.Process(pid), interval
        self.peak = self.peak_process = self.peak_root = self.hwm = 0
        self.cpu: dict[int, float] = {}
        self.cpu_start = sum(self.proc.cpu_times()[:2])  # spent before sampling: not counted
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        total = 0
        with contextlib.suppress(psutil.Error):
            for p in [self.proc, *self.proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a child that just exited
                    rss = p.memory_info().rss
                    total += rss
                    self.peak_process = max(self.peak_process, rss)
                    if p.pid == self.proc.pid:
                        self.peak_root = max(self.peak_root, rss)
                    self.cpu[p.pid] = sum(p.cpu_times()[:2])
        self.peak = max(self.peak, total)
        self.hwm = max(self.hwm, vm_hwm(self.proc.pid))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import psutil

        self._stop.set()
        self._thread.join()
        with contextlib.suppress(psutil.Error):  # a root that has exited keeps its last sample
            self.cpu[self.proc.pid] = sum(self.proc.cpu_times()[:2])

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds used by the tree while sampling (contention-free cost, unlike wall time on
        a shared machine)."""
        return sum(self.cpu.values()) - self.cpu_start

    @property
    def cpu_seconds_root(self) -> float:
        """CPU seconds used by the root process alone while sampling."""
        return self.cpu.get(self.proc.pid, self.cpu_start) - self.cpu_start


# ---- the report --------------------------------------------------------------------------------


def machine() -> dict:
    """The ``cpu`` (bench/hardware.py ``cpu_info``) and ``when`` (UTC) of a report."""
    from bench.hardware import cpu_info

    return {"cpu": cpu_info(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_json(path: Path, obj, *, indent: int = 2, ensure_ascii: bool = True, default=None) -> str:
    """``obj`` as JSON in ``path`` (folders created), with a final newline; returns the text
    without it. ``default``: as for ``json.dumps`` (``str`` writes what JSON cannot hold)."""
    text = json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii, default=default)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
    return text


def write_report(
    report: dict, out: Path | str | None = None, *, indent: int = 2, ensure_ascii: bool = True
) -> str:
    """Print ``report`` as JSON on stdout and, when ``out`` is given, also write it there."""
    if out:
        text = write_json(Path(out), report, indent=indent, ensure_ascii=ensure_ascii)
    else:
        text = json.dumps(report, indent=indent, ensure_ascii=ensure_ascii)
    print(text, flush=True)
    return text
