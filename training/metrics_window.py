"""The metrics window: running sums over the updates since the last record, logged every
`logging.log_interval` updates.

A record (metrics.jsonl, W&B, console; rank 0 only) holds `update`, `epoch`, `loss` (summed loss
/ summed sample size over the window, in bits as fairseq logs it), `lr`, `gnorm` (after
normalisation, before clipping), `sample_size` (of the last update, all ranks), `samples_per_s`
(segments, all ranks) and the task's logs (sample-size-weighted means over the window, rank 0's).
Every update also advances the progress bar with that update's loss, rate and samples/s.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from training.step import StepResult

if TYPE_CHECKING:  # pragma: no cover
    from ecgplat.tracking import Tracker


class MetricsWindow:
    """Accumulates `StepResult`s; `tracker` is None off rank 0 (nothing is logged there)."""

    def __init__(self, tracker: Tracker | None, log_interval: int, world: int):
        self.tracker, self.log_interval, self.world = tracker, log_interval, world
        self.train_loss: float | None = None  # mean loss (bits) of the last epoch with updates
        self._epoch_loss = self._epoch_size = 0.0
        self._t_update = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        self._loss = self._size = self._local_size = 0.0
        self._items = 0
        self._logs: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def add(self, step: StepResult, num_updates: int, epoch: int) -> None:
        """Count update `num_updates`; log and restart the window every `log_interval`."""
        self._epoch_loss += step.loss_sum
        self._epoch_size += step.sample_size
        self._loss += step.loss_sum
        self._size += step.sample_size
        self._local_size += step.local_size
        self._items += step.items * self.world
        for k, v in step.logs.items():
            self._logs[k] = self._logs.get(k, 0.0) + v
        if self.tracker is not None:
            now = time.perf_counter()
            rate = step.items * self.world / max(now - self._t_update, 1e-9)
            self.tracker.advance(1, loss=step.loss_bits, lr=step.lr, samples_s=rate)
            self._t_update = now
        if num_updates % self.log_interval == 0:
            if self.tracker is not None:
                self.tracker.log(self._record(step, epoch), step=num_updates)
            self._reset()

    def _record(self, last: StepResult, epoch: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self._t0
        record = {
            "epoch": epoch,
            "loss": self._loss / max(self._size, 1.0) / math.log(2),
            "lr": last.lr,
            "gnorm": last.gnorm,
            "sample_size": last.sample_size,
            "samples_per_s": self._items / max(elapsed, 1e-9),
        }
        local = max(self._local_size, 1.0)
        record.update({k: v / local for k, v in self._logs.items() if k not in record})
        return record

    def end_epoch(self) -> None:
        """Close the epoch's training loss (`train_loss`, kept if the epoch had no update)."""
        if self._epoch_size:
            self.train_loss = self._epoch_loss / self._epoch_size / math.log(2)
        self._epoch_loss = self._epoch_size = 0.0
