"""One optimizer update: forward and backward over its micro-batches, gradients normalised by the
total sample size, clipping, and the optimizer and schedule step.

Fairseq semantics: the task returns loss SUMS; the gradients are multiplied by
world_size / (sample size summed over micro-batches and ranks) after the backward passes (DDP
averages over ranks, hence the world_size factor); DDP only syncs on the last micro-batch
(`no_sync` before).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from training import distributed as dist_utils
from training.optim import LRSchedule
from training.precision import autocast
from training.tasks.base import Task


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def _count_items(batch: dict, sample_size: int) -> int:
    """Segments in a batch (leading size of `source`), for samples/s."""
    x = batch.get("source")
    return int(x.shape[0]) if torch.is_tensor(x) else int(sample_size)


@dataclass
class StepResult:
    """What one update reports to the metrics window."""

    loss_sum: float  # loss summed over the micro-batches and ranks
    sample_size: float  # sample units summed over the micro-batches and ranks
    local_size: int  # this rank's sample units
    items: int  # this rank's segments
    logs: dict[str, float]  # this rank's task logs, each summed weighted by sample units
    lr: float
    gnorm: float  # after normalisation, before clipping

    @property
    def loss_bits(self) -> float:
        """Loss per sample unit in bits, as fairseq logs it."""
        return self.loss_sum / max(self.sample_size, 1.0) / math.log(2)


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


def train_step(
    model: torch.nn.Module,
    task: Task,
    micro_batches: list[dict],
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    num_updates: int,
    *,
    device: torch.device,
    world: int = 1,
    clip_norm: float = 0.0,
    precision: str = "fp32",
) -> StepResult:
    """One update from `micro_batches` (`update_freq` of them, or fewer at the end of an
    epoch); `model` is DDP-wrapped when `world` > 1; forward passes run in `precision`
    (`training.precision`: fp32, or bf16 autocast with the losses kept in fp32)."""
    loss_sum, local_size, items, logs = 0.0, 0, 0, {}
    for i, batch in enumerate(micro_batches):
        sync = world == 1 or i == len(micro_batches) - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast(precision, device):
                loss, n, step_logs = task.train_step(model, to_device(batch, device), num_updates)
            loss.backward()
        loss_sum += float(loss.detach())
        local_size += int(n)
        items += _count_items(batch, n)
        for k, v in step_logs.items():
            logs[k] = logs.get(k, 0.0) + float(v) * int(n)
    total_loss, total_size = dist_utils.all_reduce_floats([loss_sum, float(local_size)], device)
    lr, gnorm = apply_update(model, optimizer, schedule, num_updates, total_size / world, clip_norm)
    return StepResult(total_loss, total_size, local_size, items, logs, lr, gnorm)
