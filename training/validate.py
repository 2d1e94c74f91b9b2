"""End-of-epoch validation: the task's metrics on every rank, logged as `valid_<name>`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from training.tasks.base import Task

if TYPE_CHECKING:  # pragma: no cover
    from ecgplat.tracking import Tracker


class Validator:
    """Runs `task.validate` (None: the task has no validation) and logs what it returns.

    Validation leaves the training RNG as it found it (its loader draws a seed from it): a run
    that `max_update` stops mid-epoch validates before its checkpoint, and the run resumed from
    that checkpoint must draw the same dropout masks as one never stopped."""

    def __init__(self, task: Task, tracker: Tracker | None):
        self.task, self.tracker = task, tracker

    def __call__(self, model: torch.nn.Module, epoch: int, num_updates: int) -> dict | None:
        param = next(model.parameters(), None)
        cuda = param is not None and param.device.type == "cuda"
        with torch.random.fork_rng(devices=[param.device.index or 0] if cuda else []):
            metrics = self.task.validate(model, epoch)
        if metrics and self.tracker is not None:
            self.tracker.log({"epoch": epoch, **metrics}, step=num_updates, prefix="valid_")
        return metrics
