"""The checkpoints of a training run: save, resume, best-of and patience, and the stop on a signal.

A checkpoint (format in docs/ARCHITECTURE.md) holds the model, optimizer and schedule state,
the update count, the RNG states of torch (CPU and CUDA), numpy and python `random`, the
data position (epoch and micro-batches consumed in it), the loop's best-metric bookkeeping,
the resolved config and the task's extra state. Every value is a tensor or a plain python
container, so `torch.load(path, weights_only=True)` reads it.

Files in the run directory: `checkpoint_last.pt` (written every save by the atomic
`training.models.checkpoint_file.save_checkpoint`), numbered `checkpoint_<updates>.pt` (hard links
to the same bytes, the newest `keep_last` kept) and `checkpoint_best.pt`; links are made
under a temporary name and `os.replace`d, so no file is ever seen half-written.

The loop's own position (`TrainState`) goes into `data_state`: `epoch`, `batches_done`
(micro-batches of that epoch already consumed), `best` (best validation metric so far) and
`bad_validations` (validations since the last improvement). `rng` is
`{"per_rank": [state of rank 0, ...]}`.

A resumed run continues exactly: the batches of an epoch are a pure function of (seed, epoch),
the loop skips the consumed ones, then `Checkpointer.restore_rng` puts back this rank's RNG
states. SIGTERM / SIGINT set a flag that the loop checks between updates; it then writes a
checkpoint and raises `Interrupted` (the CLI exits 128 + signal number).
"""

from __future__ import annotations

import random
import re
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ecgplat.atomic import link_or_copy
from training import distributed as dist_utils
from training.models.checkpoint_file import CheckpointError, load_checkpoint, save_checkpoint

if TYPE_CHECKING:  # pragma: no cover
    from training.optim import LRSchedule
    from training.run_config import RunConfig
    from training.tasks.base import Task

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
    """Write `checkpoint_last.pt` (atomic, via `training.models.checkpoint_file.save_checkpoint`
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


# --- the run's position, signals and the checkpointer -------------------------------------------


@dataclass
class TrainState:
    """Where a run is; what a checkpoint's `num_updates` and `data_state` carry."""

    num_updates: int = 0
    epoch: int = 1  # counts from 1
    batches_done: int = 0  # micro-batches of `epoch` consumed
    best: float | None = None  # best validation value of `checkpoint.best_metric` so far
    bad_validations: int = 0  # validations since the last improvement

    def data_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "best": self.best,
            "bad_validations": self.bad_validations,
        }


class Interrupted(Exception):
    """Training stopped by a signal after writing a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path | None):
        self.signum = signum
        self.checkpoint = checkpoint
        self.exit_code = 128 + signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name}; checkpoint written to {checkpoint}"
        )


class _StopFlag:
    """Turns SIGTERM/SIGINT into a flag checked between updates (main thread only)."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Checkpointer:
    """Saves and resumes one run: the bare `model` (before any DDP wrapping), the optimizer, the
    schedule, the shared `state` and the task's extra state. Every rank calls every method;
    rank 0 writes the files."""

    def __init__(
        self,
        cfg: RunConfig,
        task: Task,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: LRSchedule,
        state: TrainState,
        info: dist_utils.DistInfo,
    ):
        self.cfg, self.task, self.model = cfg, task, model
        self.optimizer, self.schedule, self.state, self.info = optimizer, schedule, state, info
        self.run_dir = Path(cfg.out)
        self.out_of_patience = False
        self._rng_to_restore: dict | None = None
        self._stop = _StopFlag()

    @property
    def last(self) -> Path:
        return self.run_dir / LAST

    # --- resume ------------------------------------------------------------------------------
    def resume(self) -> None:
        """Load `checkpoint_last.pt` into the model, optimizer, state and task; this rank's RNG
        states wait for `restore_rng`, after the consumed batches were skipped."""
        ckpt = load_run_checkpoint(self.run_dir, map_location=self.info.device)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        position, s = ckpt["data_state"], self.state
        s.num_updates = int(ckpt["num_updates"])
        s.epoch, s.batches_done = int(position["epoch"]), int(position["batches_done"])
        s.best, s.bad_validations = position["best"], int(position["bad_validations"])
        self.task.load_extra_state(ckpt.get("extra", {}))
        per_rank = ckpt["rng"]["per_rank"]
        rank = self.info.rank
        self._rng_to_restore = per_rank[rank] if rank < len(per_rank) else None

    def restore_rng(self) -> None:
        """Once, at the start of the resumed epoch: the RNG states the checkpoint holds."""
        if self._rng_to_restore is not None:
            restore_rng(self._rng_to_restore)
            self._rng_to_restore = None

    # --- save --------------------------------------------------------------------------------
    def save(self, is_best: bool = False) -> Path | None:
        """Collect every rank's RNG state; rank 0 writes the checkpoint and returns its path."""
        rngs = [capture_rng()]
        if self.info.distributed:
            rngs = [None] * self.info.world
            torch.distributed.all_gather_object(rngs, capture_rng())
        path = None
        if self.info.is_main:
            path = save_run_checkpoint(
                self.run_dir,
                keep_last=self.cfg.checkpoint.keep_last,
                is_best=is_best,
                kind=self.task.checkpoint_kind,
                encoder_config=self.task.encoder_config(self.model),
                model=self.model.state_dict(),
                config=self.cfg.to_dict(),
                optimizer=self.optimizer.state_dict(),
                scheduler=self.schedule.state_dict(),
                num_updates=self.state.num_updates,
                rng={"per_rank": rngs},
                data_state=self.state.data_state(),
                extra=self.task.extra_state(),
                task=self.task.checkpoint_task(),
            )
        dist_utils.barrier()
        return path

    def save_on_interval(self, max_update: float) -> None:
        """Every `checkpoint.save_interval_updates` updates, except the run's last update."""
        interval, n = self.cfg.checkpoint.save_interval_updates, self.state.num_updates
        if interval > 0 and n % interval == 0 and n < max_update:
            self.save()

    def save_epoch(self, is_best: bool) -> None:
        """The end-of-epoch checkpoint; then `Interrupted` if a signal came during the epoch's
        validation."""
        path = self.save(is_best=is_best)
        if self._stop.signum:
            raise Interrupted(self._stop.signum, path)

    # --- best-of and patience ----------------------------------------------------------------
    def record_validation(self, metrics: dict | None) -> bool:
        """Best-of and patience bookkeeping of one validation; True for a new best."""
        if not metrics:
            return False
        opts, s = self.cfg.checkpoint, self.state
        is_best = False
        if metrics.get(opts.best_metric) is not None:
            value = float(metrics[opts.best_metric])
            is_best = s.best is None or (value > s.best if opts.maximize else value < s.best)
            if is_best:
                s.best, s.bad_validations = value, 0
            else:
                s.bad_validations += 1
        self.out_of_patience = 0 < opts.patience <= s.bad_validations
        return is_best

    # --- signals -----------------------------------------------------------------------------
    def catch_signals(self) -> _StopFlag:
        """Context manager: SIGTERM / SIGINT only set `signum` while it is entered."""
        return self._stop

    @property
    def signum(self) -> int:
        """The signal received on this rank, 0 if none."""
        return self._stop.signum

    def interrupt(self, signum: int) -> Interrupted:
        """Save (every rank takes part) and return the `Interrupted` for the loop to raise."""
        return Interrupted(signum, self.save())
