"""The generic training loop: `train(cfg, task) -> summary`, readable top to bottom.

The task supplies the model, the batches and the loss (`training.tasks.base.Task`); this
module does the rest, following fairseq's trainer semantics:

* one update = `update_freq` micro-batches; the task returns loss SUMS, the gradients are
  multiplied by world_size / (sample size summed over micro-batches and ranks) after the
  backward passes (DDP averages over ranks, hence the world_size factor); DDP only syncs
  on the last micro-batch (`no_sync` before);
* Adam with decoupled weight decay and a schedule from `training.optim`; optional clipping;
* bf16 autocast on CUDA, plain fp32 on CPU;
* checkpoints every `save_interval_updates`, at every epoch end and at the end; best by
  `checkpoint.best_metric` of `task.validate`; patience early stop; `max_update`/`max_epoch`;
* resume continues exactly: the batches of an epoch are a pure function of (seed, epoch), the
  consumed ones are skipped, and the RNG states are restored after the skip;
* SIGTERM / SIGINT: finish the current update, write a checkpoint, raise `Interrupted`
  (the CLI exits 128 + signal number).

Every `log_interval` updates rank 0 writes a record (metrics.jsonl, W&B, console): `update`,
`epoch`, `loss` (summed loss / summed sample size over the window, in bits as fairseq logs
it), `lr`, `gnorm` (after normalisation, before clipping), `sample_size` (of the last
update, all ranks), `samples_per_s` (segments), and the task's logs (sample-size-weighted
means on rank 0). Validation metrics are logged as `valid_<name>`.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import distributed as dist_utils
from training import run_state
from training.config import RunConfig
from training.optim import LRSchedule, build_optimizer
from training.tasks.base import Task, unwrap


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def _fetch(batches: Iterator[dict]) -> dict | None:
    """The next batch or None. Data loading must not draw from the training RNG (a
    DataLoader draws its workers' seed from it when it starts), or a resumed run, which
    starts its loader at another point, would diverge from an uninterrupted one."""
    with torch.random.fork_rng(devices=[]):
        return next(batches, None)


def _count_items(batch: dict, sample_size: int) -> int:
    """Segments in a batch (leading size of `source`), for samples/s."""
    x = batch.get("source")
    return int(x.shape[0]) if torch.is_tensor(x) else int(sample_size)


def apply_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    num_updates: int,
    sample_size: float,
    clip_norm: float = 0.0,
) -> tuple[float, float]:
    """Divide the summed gradients by `sample_size` (per process: DDP has already averaged
    over ranks, so pass total / world), clip if `clip_norm` > 0, set the scheduled rate and
    take the optimizer step. Returns (lr, gradient norm before clipping)."""
    if sample_size > 0:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / sample_size)
    gnorm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), clip_norm if clip_norm > 0 else float("inf")
    )
    lr = schedule.apply(optimizer, num_updates)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, float(gnorm)


def _new_window() -> dict:
    """Accumulators of the metrics logged every `log_interval` updates."""
    return {
        "loss": 0.0,
        "sample_size": 0.0,
        "local_size": 0.0,
        "items": 0,
        "t0": time.perf_counter(),
        "logs": {},
    }


def train(cfg: RunConfig, task: Task, *, resume: bool = False) -> dict[str, Any]:
    """Train `task` under `cfg`; returns a summary dict. `resume`: continue from
    `cfg.out/checkpoint_last.pt`. Raises `Interrupted` after a signal (checkpoint written)."""
    info = dist_utils.setup(cfg.device)
    device, rank, world = info.device, info.rank, info.world
    if device.type == "cpu":
        dist_utils.limit_heap_growth()
    run_dir = Path(cfg.out)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    # --- model, optimizer, schedule ---------------------------------------------------------
    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = task.build_model().to(device)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    schedule = LRSchedule(cfg.optim)
    num_updates, epoch, batches_done = 0, 1, 0
    best, bad_validations, rng_to_restore = None, 0, None

    if resume:
        ckpt = run_state.load_run_checkpoint(run_dir, map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        num_updates = int(ckpt["num_updates"])
        position = ckpt["data_state"]
        epoch, batches_done = int(position["epoch"]), int(position["batches_done"])
        best, bad_validations = position["best"], int(position["bad_validations"])
        task.load_extra_state(ckpt.get("extra", {}))
        per_rank = ckpt["rng"]["per_rank"]
        rng_to_restore = per_rank[rank] if rank < len(per_rank) else None
        del ckpt
    else:
        seed_everything(cfg.seed + rank)  # different masks / dropout per rank
    task.on_update(model, num_updates)  # e.g. the quantizer temperature of a resumed run

    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=getattr(task, "find_unused_parameters", True),
        )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )

    tracker = None
    if info.is_main:
        from ecgplat.tracking import Tracker

        tracker = Tracker(
            run_dir,
            config=cfg.to_dict(),
            mode=cfg.logging.wandb_mode,
            project=cfg.logging.wandb_project,
            name=run_dir.name,
            job_type=task.name,
            resume=resume,
        )
        if resume:
            tracker.truncate_after(num_updates)

    def save(is_best: bool = False) -> Path | None:
        """Collect every rank's RNG state; rank 0 writes the checkpoint."""
        rngs = [run_state.capture_rng()]
        if info.distributed:
            rngs = [None] * world
            torch.distributed.all_gather_object(rngs, run_state.capture_rng())
        path = None
        if info.is_main:
            path = run_state.save_run_checkpoint(
                run_dir,
                keep_last=cfg.checkpoint.keep_last,
                is_best=is_best,
                kind=task.checkpoint_kind,
                encoder_config=task.encoder_config(model),
                model=unwrap(model).state_dict(),
                config=cfg.to_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=schedule.state_dict(),
                num_updates=num_updates,
                rng={"per_rank": rngs},
                data_state={
                    "epoch": epoch,
                    "batches_done": batches_done,
                    "best": best,
                    "bad_validations": bad_validations,
                },
                extra=task.extra_state(),
            )
        dist_utils.barrier()
        return path

    def improved(value: float) -> bool:
        if best is None:
            return True
        return value > best if cfg.checkpoint.maximize else value < best

    max_update = cfg.optim.max_update or math.inf
    max_epoch = cfg.optim.max_epoch or math.inf
    update_freq = cfg.optim.update_freq
    per_epoch = task.batches_per_epoch(rank, world)
    if tracker is not None:
        total = cfg.optim.max_update or (
            math.ceil(per_epoch / update_freq) * cfg.optim.max_epoch
            if per_epoch and cfg.optim.max_epoch
            else None
        )
        tracker.start_progress(total, description=task.name, completed=num_updates)

    stop_reason, last_train_loss = "max_epoch", None
    window = _new_window()
    t_update = time.perf_counter()
    try:
        with _StopFlag() as stop:
            while epoch <= max_epoch and num_updates < max_update and stop_reason != "patience":
                # --- one epoch --------------------------------------------------------------
                stream = task.train_batches(rank, world, epoch)
                if batches_done and hasattr(stream, "start_at"):
                    stream.start_at(batches_done)  # resume: jump past the consumed batches
                batches: Iterator[dict] = iter(stream)
                if batches_done and not hasattr(stream, "start_at"):
                    for _ in range(batches_done):
                        _fetch(batches)
                if rng_to_restore is not None:
                    run_state.restore_rng(rng_to_restore)
                    rng_to_restore = None
                model.train()
                epoch_loss, epoch_size = 0.0, 0.0
                while num_updates < max_update:
                    group = [
                        b for b in (_fetch(batches) for _ in range(update_freq)) if b is not None
                    ]
                    # every rank must agree: stop on a signal anywhere, end the epoch when
                    # any rank ran out of batches (an unmatched DDP all-reduce would hang)
                    missing, signalled = dist_utils.all_reduce_floats(
                        [float(not group), float(stop.signum)], device, op="max"
                    )
                    if signalled:
                        raise Interrupted(int(signalled), save())
                    if missing:
                        break

                    # forward/backward over the micro-batches; sync grads on the last only
                    loss_sum, sample_size, sum_local, items, logs = 0.0, 0, 0, 0, {}
                    for i, batch in enumerate(group):
                        sync = i == len(group) - 1 or not info.distributed
                        with contextlib.nullcontext() if sync else model.no_sync():
                            with autocast:
                                loss, n, step_logs = task.train_step(
                                    model, to_device(batch, device), num_updates
                                )
                            loss.backward()
                        loss_sum += float(loss.detach())
                        sample_size += int(n)
                        sum_local += int(n)
                        items += _count_items(batch, n)
                        for k, v in step_logs.items():
                            logs[k] = logs.get(k, 0.0) + float(v) * int(n)
                    loss_sum, sample_size = dist_utils.all_reduce_floats(
                        [loss_sum, float(sample_size)], device
                    )
                    lr, gnorm = apply_update(
                        model,
                        optimizer,
                        schedule,
                        num_updates,
                        sample_size / world,
                        cfg.optim.clip_norm,
                    )
                    num_updates += 1
                    batches_done += len(group)
                    task.on_update(unwrap(model), num_updates)

                    # --- logging ------------------------------------------------------------
                    update_loss = loss_sum / max(sample_size, 1.0) / math.log(2)  # bits
                    epoch_loss += loss_sum
                    epoch_size += sample_size
                    window["loss"] += loss_sum
                    window["sample_size"] += sample_size
                    window["local_size"] += sum_local
                    window["items"] += items * world
                    for k, v in logs.items():
                        window["logs"][k] = window["logs"].get(k, 0.0) + v
                    if tracker is not None:
                        now = time.perf_counter()
                        tracker.advance(
                            1,
                            loss=update_loss,
                            lr=lr,
                            samples_s=items * world / max(now - t_update, 1e-9),
                        )
                        t_update = now
                    if num_updates % cfg.logging.log_interval == 0:
                        elapsed = time.perf_counter() - window["t0"]
                        size = max(window["sample_size"], 1.0)
                        record = {
                            "epoch": epoch,
                            "loss": window["loss"] / size / math.log(2),
                            "lr": lr,
                            "gnorm": gnorm,
                            "sample_size": sample_size,
                            "samples_per_s": window["items"] / max(elapsed, 1e-9),
                        }
                        # task logs: sample-size-weighted means over the window (rank 0's)
                        local = max(window["local_size"], 1.0)
                        record.update(
                            {k: v / local for k, v in window["logs"].items() if k not in record}
                        )
                        if tracker is not None:
                            tracker.log(record, step=num_updates)
                        window = _new_window()

                    interval = cfg.checkpoint.save_interval_updates
                    if interval > 0 and num_updates % interval == 0 and num_updates < max_update:
                        save()

                # --- end of epoch (or of training): validation, best, patience, save -------
                finished_epoch = num_updates < max_update or (
                    per_epoch is not None and batches_done >= per_epoch
                )
                if finished_epoch and batches_done == 0:
                    raise ValueError(
                        f"epoch {epoch}: the task yielded no training batches on rank {rank}"
                    )
                if epoch_size:
                    last_train_loss = epoch_loss / epoch_size / math.log(2)
                metrics = task.validate(model, epoch)
                is_best = False
                if metrics:
                    if tracker is not None:
                        tracker.log({"epoch": epoch, **metrics}, step=num_updates, prefix="valid_")
                    value = metrics.get(cfg.checkpoint.best_metric)
                    if value is not None and improved(float(value)):
                        best, bad_validations, is_best = float(value), 0, True
                    elif value is not None:
                        bad_validations += 1
                    if 0 < cfg.checkpoint.patience <= bad_validations:
                        stop_reason = "patience"
                if finished_epoch:
                    epoch += 1
                    batches_done = 0
                path = save(is_best=is_best)
                if stop.signum:
                    raise Interrupted(stop.signum, path)
                if num_updates >= max_update:
                    stop_reason = "max_update"
        summary = {
            "num_updates": num_updates,
            "epochs": epoch - 1,
            "stop_reason": stop_reason,
            "best": best,
            "best_metric": cfg.checkpoint.best_metric,
            "train_loss": last_train_loss,
            "checkpoint": str(run_dir / run_state.LAST),
        }
        if tracker is not None:
            tracker.summary(summary)
    finally:
        if tracker is not None:
            tracker.close()
    return summary
