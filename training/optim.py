"""Optimizer and learning-rate schedules (fairseq's `adam` + `fixed` / `tri_stage` / cosine).

The optimizer is Adam with decoupled weight decay, p <- p - lr*wd*p before the Adam step,
applied to every parameter that receives a gradient (biases and norms included), as in
fairseq's `adam.py`. `torch.optim.AdamW` implements exactly that decoupled step
(`p.mul_(1 - lr*wd)` first); tests/test_optim.py checks it against a hand-computed update.

Schedules are pure functions of the number of updates already done, so they need no state
beyond `num_updates` and resume exactly: `LRSchedule.lr_at(num_updates)` is the rate used for
the next update.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from training.run_config import OptimConfig


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig
) -> torch.optim.Optimizer:
    """Adam(betas, eps) with decoupled weight decay `cfg.weight_decay` at rate `cfg.lr`."""
    params = [p for p in params if p.requires_grad]
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    try:
        # the fused kernel is one pass over each tensor (CPU and CUDA): ~5x faster than the
        # multi-pass foreach default on the paper model on CPU, and no full-size temporaries
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without the kernel
        return torch.optim.AdamW(params, **kwargs)


class LRSchedule:
    """lr as a function of completed updates.

    * `fixed`: `lr`, with an optional linear warmup `lr*(u+1)/warmup_updates` for u < warmup.
    * `tri_stage`: stages of `phase_ratio * max_update` updates: linear from
      `init_lr_scale*lr` to `lr`, hold `lr`, exponential decay to `final_lr_scale*lr`, then
      constant `final_lr_scale*lr` (fairseq's tri_stage_lr_scheduler).
    * `cosine`: linear warmup as `fixed`, then a half cosine from `lr` down to
      `final_lr_scale*lr` at `max_update`, constant afterwards.
    """

    def __init__(self, cfg: OptimConfig):
        self.cfg = cfg
        self.peak = cfg.lr
        if cfg.schedule == "tri_stage":
            r = cfg.phase_ratio
            self.warmup = int(cfg.max_update * r[0])
            self.hold = int(cfg.max_update * r[1])
            self.decay = int(cfg.max_update * r[2])
            self.init_lr = cfg.init_lr_scale * self.peak
            self.final_lr = cfg.final_lr_scale * self.peak
            self.warmup_rate = (self.peak - self.init_lr) / self.warmup if self.warmup else 0.0
            self.decay_factor = -math.log(cfg.final_lr_scale) / self.decay if self.decay else 0.0
        elif cfg.schedule not in ("fixed", "cosine"):
            raise ValueError(f"unknown lr schedule '{cfg.schedule}'")

    def lr_at(self, num_updates: int) -> float:
        s, u = self.cfg.schedule, num_updates
        if s == "tri_stage":
            if u < self.warmup:
                return self.init_lr + self.warmup_rate * u
            u -= self.warmup
            if u < self.hold:
                return self.peak
            u -= self.hold
            if u <= self.decay:
                return self.peak * math.exp(-self.decay_factor * u)
            return self.final_lr
        warmup = self.cfg.warmup_updates
        if warmup > 0 and u < warmup:
            return self.peak * (u + 1) / warmup
        if s == "fixed":
            return self.peak
        span = max(1, self.cfg.max_update - warmup)
        t = min(1.0, (u - warmup) / span)
        final = self.cfg.final_lr_scale * self.peak
        return final + (self.peak - final) * 0.5 * (1.0 + math.cos(math.pi * t))

    def apply(self, optimizer: torch.optim.Optimizer, num_updates: int) -> float:
        """Set the rate of every param group for the next update; returns it."""
        lr = self.lr_at(num_updates)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"schedule": self.cfg.schedule}

    def load_state_dict(self, state: dict) -> None:
        # stateless: the rate follows from num_updates, restored by the loop
        return None
