"""The generic training loop: `train(cfg, task) -> summary`, readable top to bottom.

The task supplies the model, the batches and the loss (`training.tasks.base.Task`); the loop
follows fairseq's trainer semantics and hands each concern to one piece:

* `training.step.train_step`: one update = `update_freq` micro-batches, forward/backward in the
  run's precision (`precision=auto|fp32|bf16`, resolved once per run by
  `training.precision.resolve_precision` and logged as `precision_resolved`), gradients divided
  by the sample size over micro-batches and ranks, optional clipping, Adam with decoupled weight
  decay and the `training.optim` schedule;
* `training.checkpointer.Checkpointer`: checkpoints every `save_interval_updates`, at every
  epoch end and at the end; best by `checkpoint.best_metric` and patience; exact resume; on
  SIGTERM / SIGINT it finishes the current update, writes a checkpoint and raises `Interrupted`
  (the CLI exits 128 + signal number);
* `training.metrics_window.MetricsWindow`: the record logged every `log_interval` updates;
* `training.validate.Validator`: `task.validate` at every epoch end, logged as `valid_<name>`.

Training stops at `optim.max_update`, after `optim.max_epoch` epochs or when patience runs out.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from training import distributed as dist_utils
from training.checkpointer import Checkpointer, Interrupted, TrainState
from training.compile import compile_layers
from training.compile import decide as decide_compile
from training.metrics_window import MetricsWindow
from training.optim import LRSchedule, build_optimizer
from training.precision import resolve_precision
from training.run_config import RunConfig
from training.step import train_step
from training.tasks.base import Task, unwrap
from training.validate import Validator

if TYPE_CHECKING:  # pragma: no cover
    from ecgplat.tracking import Tracker

__all__ = ["Interrupted", "seed_everything", "train"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: RunConfig, task: Task, *, resume: bool = False) -> dict[str, Any]:
    """Train `task` under `cfg`; returns a summary dict. `resume`: continue from
    `cfg.out/checkpoint_last.pt`. Raises `Interrupted` after a signal (checkpoint written)."""
    info = dist_utils.setup(cfg.device)
    if info.device.type == "cpu":
        dist_utils.limit_heap_growth()
    if info.is_main:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)

    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = task.build_model().to(info.device)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    schedule = LRSchedule(cfg.optim)
    state = TrainState()
    ckpt = Checkpointer(cfg, task, model, optimizer, schedule, state, info)
    if resume:
        ckpt.resume()
    else:
        seed_everything(cfg.seed + info.rank)  # different masks / dropout per rank
    task.on_update(model, state.num_updates)  # e.g. the quantizer temperature of a resumed run

    per_epoch = task.batches_per_epoch(info.rank, info.world)
    precision = resolve_precision(cfg.precision, info.device)
    planned = _planned_updates(cfg, per_epoch)
    if decide_compile(cfg.compile, model, info.device, precision, planned):
        compile_layers(model)  # falls back to eager, warning once, where compiling fails
    model = _wrap_ddp(model, task, info)
    tracker = _open_tracker(cfg, task, info, resume, state.num_updates, precision)
    if tracker is not None:
        total = _planned_updates(cfg, per_epoch)
        tracker.start_progress(total, description=task.name, completed=state.num_updates)

    window = MetricsWindow(tracker, cfg.logging.log_interval, info.world)
    validator = Validator(task, tracker)
    run = _Run(
        cfg,
        task,
        info,
        model,
        optimizer,
        schedule,
        state,
        ckpt,
        window,
        validator,
        per_epoch,
        precision,
    )
    max_epoch, stop_reason = cfg.optim.max_epoch or math.inf, "max_epoch"
    try:
        with ckpt.catch_signals():
            while (
                state.epoch <= max_epoch
                and state.num_updates < run.max_update
                and stop_reason != "patience"
            ):
                _train_epoch(run)
                _end_epoch(run)
                if ckpt.out_of_patience:
                    stop_reason = "patience"
                if state.num_updates >= run.max_update:
                    stop_reason = "max_update"
        summary = _summary(run, stop_reason)
        if tracker is not None:
            tracker.summary(summary)
            _log_dashboard(run, tracker)
    finally:
        if tracker is not None:
            tracker.close()
    return summary


# --- the pieces of one run, and one epoch ---------------------------------------------------------


@dataclass
class _Run:
    """What the epoch functions share; `model` is DDP-wrapped in a distributed run."""

    cfg: RunConfig
    task: Task
    info: dist_utils.DistInfo
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    state: TrainState
    checkpointer: Checkpointer
    window: MetricsWindow
    validator: Validator
    per_epoch: int | None  # batches per epoch on this rank, if the task knows
    precision: str  # resolved: "fp32" | "bf16"

    @property
    def max_update(self) -> float:
        return self.cfg.optim.max_update or math.inf


def _wrap_ddp(model: torch.nn.Module, task: Task, info: dist_utils.DistInfo) -> torch.nn.Module:
    if not info.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model,
        device_ids=[info.device.index] if info.device.type == "cuda" else None,
        find_unused_parameters=getattr(task, "find_unused_parameters", True),
    )


def _open_tracker(
    cfg: RunConfig,
    task: Task,
    info: dist_utils.DistInfo,
    resume: bool,
    num_updates: int,
    precision: str,
) -> Tracker | None:
    """The run's metric tracker on rank 0 (None elsewhere); a resumed run drops the records
    logged after its checkpoint."""
    if not info.is_main:
        return None
    from ecgplat.tracking import Tracker

    tracker = Tracker(
        cfg.out,
        config={**cfg.to_dict(), "precision_resolved": precision},
        mode=cfg.logging.wandb_mode,
        project=cfg.logging.wandb_project,
        name=Path(cfg.out).name,
        job_type=task.name,
        resume=resume,
    )
    if resume:
        tracker.truncate_after(num_updates)
    return tracker


def _planned_updates(cfg: RunConfig, per_epoch: int | None) -> int | None:
    """Updates the run will make, for the progress bar (None if unknown)."""
    if cfg.optim.max_update:
        return cfg.optim.max_update
    if per_epoch and cfg.optim.max_epoch:
        return math.ceil(per_epoch / cfg.optim.update_freq) * cfg.optim.max_epoch
    return None


def _fetch(batches: Iterator[dict]) -> dict | None:
    """The next batch or None. Data loading must not draw from the training RNG (a
    DataLoader draws its workers' seed from it when it starts), or a resumed run, which
    starts its loader at another point, would diverge from an uninterrupted one."""
    with torch.random.fork_rng(devices=[]):
        return next(batches, None)


def _epoch_batches(run: _Run) -> Iterator[dict]:
    """This rank's batches of the current epoch, past the `batches_done` already consumed."""
    done = run.state.batches_done
    stream = run.task.train_batches(run.info.rank, run.info.world, run.state.epoch)
    if done and hasattr(stream, "start_at"):
        stream.start_at(done)  # resume: jump past the consumed batches
    batches = iter(stream)
    if done and not hasattr(stream, "start_at"):
        for _ in range(done):
            _fetch(batches)
    return batches


def _train_epoch(run: _Run) -> None:
    """Updates until the epoch's batches run out on any rank or `max_update` is reached."""
    state, info = run.state, run.info
    batches = _epoch_batches(run)
    run.checkpointer.restore_rng()  # a resumed run: after the skip, as when it was saved
    run.model.train()
    while state.num_updates < run.max_update:
        fetched = (_fetch(batches) for _ in range(run.cfg.optim.update_freq))
        group = [b for b in fetched if b is not None]
        # every rank must agree: stop on a signal anywhere, end the epoch when any rank ran
        # out of batches (an unmatched DDP all-reduce would hang)
        missing, signalled = dist_utils.all_reduce_floats(
            [float(not group), float(run.checkpointer.signum)], info.device, op="max"
        )
        if signalled:
            raise run.checkpointer.interrupt(int(signalled))
        if missing:
            break
        step = train_step(
            run.model,
            run.task,
            group,
            run.optimizer,
            run.schedule,
            state.num_updates,
            device=info.device,
            world=info.world,
            clip_norm=run.cfg.optim.clip_norm,
            precision=run.precision,
        )
        state.num_updates += 1
        state.batches_done += len(group)
        run.task.on_update(unwrap(run.model), state.num_updates)
        run.window.add(step, state.num_updates, state.epoch)
        run.checkpointer.save_on_interval(run.max_update)


def _end_epoch(run: _Run) -> None:
    """Validation, best-of and patience, the epoch count and the end-of-epoch checkpoint (the
    last one when `max_update` ended the epoch early)."""
    state = run.state
    finished = state.num_updates < run.max_update or (
        run.per_epoch is not None and state.batches_done >= run.per_epoch
    )
    if finished and state.batches_done == 0:
        raise ValueError(
            f"epoch {state.epoch}: the task yielded no training batches on rank {run.info.rank}"
        )
    run.window.end_epoch()
    metrics = run.validator(run.model, state.epoch, state.num_updates)
    is_best = run.checkpointer.record_validation(metrics)
    if finished:
        state.epoch += 1
        state.batches_done = 0
    run.checkpointer.save_epoch(is_best)


def _log_dashboard(run: _Run, tracker: Tracker) -> None:
    """W&B at the end of a run: the last validation's dashboard and the checkpoint artifact
    (`training.dashboard.log_training_run`); a W&B failure is reported, never fatal here."""
    if tracker.wandb_run is None:
        return
    from training.dashboard import log_training_run

    try:
        log_training_run(tracker, run.task, run.cfg, run.state.num_updates)
    except Exception as e:  # noqa: BLE001 - the run's checkpoints are written: warn, go on
        print(f"warning: W&B dashboard not logged ({type(e).__name__}: {e})", file=sys.stderr)


def _summary(run: _Run, stop_reason: str) -> dict[str, Any]:
    return {
        "num_updates": run.state.num_updates,
        "epochs": run.state.epoch - 1,
        "stop_reason": stop_reason,
        "best": run.state.best,
        "best_metric": run.cfg.checkpoint.best_metric,
        "train_loss": run.window.train_loss,
        "precision": run.precision,
        "checkpoint": str(run.checkpointer.last),
    }
