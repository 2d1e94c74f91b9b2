"""Deterministic crash points for fault-injection tests: ``ECGPLAT_FAULT_STOP=<name>``.

A writer calls ``stop_point("index.between")`` at a named step; when the environment variable
names that step the process kills itself there with SIGKILL (no cleanup, no ``finally``), as
a crash or an out-of-memory kill would. Unset, the call costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "ECGPLAT_FAULT_STOP"


def stop_point(name: str) -> None:
    """Kill this process with SIGKILL if ``$ECGPLAT_FAULT_STOP`` equals ``name``."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
