"""Deterministic crash points for fault-injection tests: ``ECGPLAT_FAULT_STOP=<name>``.

A writer calls ``stop_point("index.between")`` at a named step, or ``stop_at_count("commit", n)``
at a step that repeats (``ECGPLAT_FAULT_STOP=commit:N`` stops at the first call with n >= N); when
the environment variable names that step the process kills itself there with SIGKILL (no cleanup,
no ``finally``), as a crash or an out-of-memory kill would. Unset, a call costs one lookup.

``ECGPLAT_TEST_CRASH_ON=<record>`` makes ``worker_crash_point(record)`` exit a Dask worker process
(never the driver) on that record, the way a worker killed for memory dies.
"""

from __future__ import annotations

import os
import signal

ENV = "ECGPLAT_FAULT_STOP"
WORKER_CRASH_ENV = "ECGPLAT_TEST_CRASH_ON"


def stop_point(name: str) -> None:
    """Kill this process with SIGKILL if ``$ECGPLAT_FAULT_STOP`` equals ``name``."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def stop_at_count(name: str, count: int) -> None:
    """SIGKILL this process if ``$ECGPLAT_FAULT_STOP`` is ``name:N`` and ``count >= N``."""
    value = os.environ.get(ENV, "")
    if value.startswith(name + ":") and count >= int(value[len(name) + 1 :]):
        os.kill(os.getpid(), signal.SIGKILL)


def worker_crash_point(record: str) -> None:
    """Exit this Dask worker process if ``$ECGPLAT_TEST_CRASH_ON`` names ``record``."""
    if os.environ.get(WORKER_CRASH_ENV) != record:
        return
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):  # not inside a worker: the driver never exits
        return
    os._exit(70)
