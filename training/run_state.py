"""Checkpoint files of a training run: the full run state, written atomically, resumable.

A checkpoint (format in docs/ARCHITECTURE.md) holds the model, optimizer and schedule state,
the update count, the RNG states of torch (CPU and CUDA), numpy and python `random`, the
data position (epoch and micro-batches consumed in it), the loop's best-metric bookkeeping,
the resolved config and the task's extra state. Every value is a tensor or a plain python
container, so `torch.load(path, weights_only=True)` reads it.

Files in the run directory: `checkpoint_last.pt` (written every save by the atomic
`training.models.checkpoint.save_checkpoint`), numbered `checkpoint_<updates>.pt` (hard links
to the same bytes, the newest `keep_last` kept) and `checkpoint_best.pt`; links are made
under a temporary name and `os.replace`d, so no file is ever seen half-written.

The loop's own position goes into `data_state`: `epoch`, `batches_done` (micro-batches of
that epoch already consumed), `best` (best validation metric so far) and `bad_validations`
(validations since the last improvement). `rng` is `{"per_rank": [state of rank 0, ...]}`.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecgplat.atomic import link_or_copy
from training.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
_NUMBERED = re.compile(r"^checkpoint_(\d+)\.pt$")


# --- RNG -------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """RNG states of torch, CUDA, numpy and python `random` as weights_only-safe values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- files -----------------------------------------------------------------------------------


def save_run_checkpoint(
    run_dir: str | Path, *, keep_last: int = 1, is_best: bool = False, **fields: Any
) -> Path:
    """Write `checkpoint_last.pt` (atomic, via `training.models.checkpoint.save_checkpoint`
    whose keyword fields this takes), its numbered hard link and optionally `checkpoint_best.pt`;
    prune numbered checkpoints beyond the newest `keep_last`."""
    run_dir = Path(run_dir)
    last = save_checkpoint(run_dir / LAST, **fields)
    if keep_last > 0:
        link_or_copy(last, run_dir / f"checkpoint_{int(fields['num_updates'])}.pt")
        numbered = sorted(
            (int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NUMBERED.match(p.name))
        )
        for _, old in numbered[:-keep_last]:
            old.unlink(missing_ok=True)
    if is_best:
        link_or_copy(last, run_dir / BEST)
    return last


def load_run_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """`checkpoint_last.pt` of a run, checked to carry a resumable run state."""
    path = Path(run_dir) / LAST
    ckpt = load_checkpoint(path, map_location=map_location)
    for key in ("optimizer", "num_updates", "rng", "data_state"):
        if not ckpt.get(key) and key != "num_updates":
            raise CheckpointError(path, f"no {key} state: not a resumable training checkpoint")
    return ckpt
