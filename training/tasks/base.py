"""The Task protocol: what a training task supplies to the generic loop in `training.loop`.

A task owns the model, the data and the loss; the loop owns everything else (device, DDP,
optimizer, schedule, accumulation, gradient normalisation, checkpoints, resume, logging).

Contract (see docs/ARCHITECTURE.md):

* `build_model()` returns a fresh model on the CPU, or one initialised from
  `cfg.finetune.init` (strict load). The loop moves it to the device and wraps it in DDP.
* `train_batches(rank, world, epoch)` returns an iterable of dicts of CPU tensors (plus
  plain python values such as lists of strings) for this rank; epochs count from 1. The
  order must be a pure function of `(cfg.seed, epoch, rank, world)` so that resume can skip
  the consumed batches exactly; if the iterable has `start_at(k)` (training.data's
  BatchStream) resume calls it instead of drawing and dropping k batches. Every rank must
  yield the same number of batches (the loop ends the epoch when any rank runs out).
* `train_step(model, batch, num_updates)` runs the forward pass and returns
  `(loss, sample_size, logs)`: `loss` is the loss SUMMED over the batch's sample units
  (masked frames, label entries, segments), `sample_size` the number of those units and
  `logs` a dict of floats (already per-unit where that is meaningful). The loop divides the
  gradients by the total sample size over accumulation steps and ranks (fairseq semantics).
  `model` may be wrapped in DDP; use `unwrap(model)` to reach custom methods.
* `on_update(model, num_updates)` runs after every optimizer update (e.g. the quantizer
  temperature); `num_updates` is the count after the update. It is also called once before
  training starts (0, or the resumed count). `model` is the bare (unwrapped) model.
* `validate(model, epoch)` returns a dict of float metrics or None (no validation). It is
  called on every rank; the task must make the result identical on all ranks (compute it on
  every rank, or all-reduce with `training.distributed` helpers).
* `extra_state()` goes into `checkpoint["extra"]` (e.g. class maps); `load_extra_state` gets
  it back on resume. `checkpoint_task()` is the "task" entry of a model with a task head
  (`training.tasks.supervised`), None for the others.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from training.run_config import RunConfig


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under a DistributedDataParallel (or similar `.module`) wrapper."""
    return (
        model.module
        if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel)
        else model
    )


class Task:
    """Base class of the training tasks; subclasses set `name` and `checkpoint_kind`."""

    name: str = "base"
    checkpoint_kind: str = "pretrain"
    find_unused_parameters: bool = True  # DDP option; False is faster when every param is used

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    # --- model -------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def encoder_config(self, model: torch.nn.Module) -> dict:
        """EncoderConfig fields for the checkpoint's `encoder_config` (rebuilds the encoder)."""
        m = unwrap(model)
        cfg = getattr(getattr(m, "encoder", m), "cfg", None)
        if cfg is None:
            return {}
        return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)

    # --- data --------------------------------------------------------------------------------
    def train_batches(self, rank: int, world: int, epoch: int) -> Iterable[dict]:
        raise NotImplementedError

    def batches_per_epoch(self, rank: int, world: int) -> int | None:
        """Number of batches `train_batches` yields per epoch on this rank, if known."""
        return self.cfg.data.epoch_batches

    # --- step --------------------------------------------------------------------------------
    def train_step(
        self, model: torch.nn.Module, batch: dict, num_updates: int
    ) -> tuple[torch.Tensor, int, dict]:
        raise NotImplementedError

    def on_update(self, model: torch.nn.Module, num_updates: int) -> None:
        return None

    def validate(self, model: torch.nn.Module, epoch: int) -> dict | None:
        return None

    # --- checkpoint state --------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    def checkpoint_task(self) -> dict[str, Any] | None:
        """The checkpoint's "task" entry of a model with a task head (training.tasks.heads)."""
        return None
