"""A head per task kind: the loss, the checkpoint's "task" entry and head outputs -> predictions.

* binary / multilabel: sigmoid per output, binary cross-entropy (optional ``pos_weight``),
  labels are ``probability >= threshold`` per output (0.5 where no threshold was fitted);
* multiclass: softmax over the outputs, cross-entropy on the class index, label = argmax;
* regression: the head predicts the standardised target ``(y - mean) / std``; MSE or Huber on
  it; predictions are de-standardised with the checkpoint's ``target_mean`` / ``target_std``.

The checkpoint's ``task`` entry (docs/formats.md, "Checkpoints") is ``TaskSpec.to_dict()`` plus
``thresholds``, ``threshold_rule``, ``target_mean`` and ``target_std``; a checkpoint without it
(a diagnosis checkpoint from before tasks) is the 26-class ``DIAGNOSIS`` with thresholds 0.5.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ecgplat.tasks import DIAGNOSIS, KINDS, TaskSpec

TASK_FIELDS = ("thresholds", "threshold_rule", "target_mean", "target_std")


def task_entry(
    spec: TaskSpec,
    thresholds: list[float] | None = None,
    threshold_rule: str | None = None,
    target_mean: list[float] | None = None,
    target_std: list[float] | None = None,
) -> dict[str, Any]:
    """The checkpoint's "task" dict (plain floats and strings: weights_only-safe, JSON-able)."""
    return spec.to_dict() | {
        "thresholds": None if thresholds is None else [float(t) for t in thresholds],
        "threshold_rule": threshold_rule,
        "target_mean": None if target_mean is None else [float(v) for v in target_mean],
        "target_std": None if target_std is None else [float(v) for v in target_std],
    }


def task_of_checkpoint(ckpt: dict) -> dict[str, Any]:
    """The "task" entry of a fine-tuned checkpoint, checked; a "diagnosis" checkpoint without one
    is DIAGNOSIS with thresholds 0.5. ValueError for a checkpoint with no task head (pretrain,
    identify) or a malformed entry."""
    task = ckpt.get("task")
    if task is None:
        if ckpt.get("kind") != "diagnosis":
            raise ValueError(
                f"a {ckpt.get('kind')!r} checkpoint has no task head (fine-tune it with "
                "`ecgplat train finetune`)"
            )
        return task_entry(DIAGNOSIS, [0.5] * DIAGNOSIS.num_outputs, "fixed")
    try:
        spec = TaskSpec.from_dict(task)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed task entry in the checkpoint: {e}") from None
    out = spec.to_dict() | {k: task.get(k) for k in TASK_FIELDS}
    n = spec.num_outputs
    for key in TASK_FIELDS[:1] + TASK_FIELDS[2:]:
        if out[key] is not None and len(out[key]) != n:
            raise ValueError(f"task {spec.name}: {key} has {len(out[key])} values for {n} outputs")
    if spec.kind == "regression" and (out["target_mean"] is None or out["target_std"] is None):
        raise ValueError(f"task {spec.name}: a regression checkpoint lacks target_mean/target_std")
    return out


def outputs_to_predictions(logits: torch.Tensor, task: dict) -> dict[str, Any]:
    """Head outputs (N, outputs) of a model for `task` (a `task_of_checkpoint` dict) as numpy:

    * binary / multilabel: ``probabilities`` (N, C) float32 sigmoid, ``labels`` (N, C) bool at
      the task's thresholds (0.5 where None);
    * multiclass: ``probabilities`` (N, C) float32 softmax, ``labels`` (N,) int64 class index
      (argmax) into ``task["classes"]``;
    * regression: ``values`` (N, C) float32 in the target's units, and ``labels`` the same array.
    """
    z = logits.detach().float().cpu()
    if z.ndim == 1:
        z = z[:, None]
    kind = task["kind"]
    if kind in ("binary", "multilabel"):
        p = torch.sigmoid(z).numpy().astype(np.float32)
        thr = task.get("thresholds")
        t = np.full(p.shape[1], 0.5) if thr is None else np.asarray(thr, dtype=np.float64)
        return {"probabilities": p, "labels": p >= t[None, :]}
    if kind == "multiclass":
        p = torch.softmax(z, dim=1).numpy().astype(np.float32)
        return {"probabilities": p, "labels": p.argmax(axis=1).astype(np.int64)}
    if kind == "regression":
        mean = np.asarray(task["target_mean"], dtype=np.float64)
        std = np.asarray(task["target_std"], dtype=np.float64)
        v = (z.numpy().astype(np.float64) * std[None, :] + mean[None, :]).astype(np.float32)
        return {"values": v, "labels": v}
    raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")


def head_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    pos_weight: torch.Tensor | None = None,
    regression_loss: str = "mse",
    huber_delta: float = 1.0,
) -> tuple[torch.Tensor, int]:
    """(loss summed over the units, number of units) for `kind` (fairseq semantics: the loop
    divides by the unit count). `target`: binary/multilabel (B, C) 0/1; multiclass (B,) class
    index; regression (B, C) standardised values. Rows with a NaN target (regression) or a
    negative class index are left out."""
    z = logits.float()
    if kind in ("binary", "multilabel"):
        y = target.to(z.device, torch.float32)
        pw = None if pos_weight is None else pos_weight.to(z.device, torch.float32)
        loss = F.binary_cross_entropy_with_logits(z, y, pos_weight=pw, reduction="sum")
        return loss, y.numel()
    if kind == "multiclass":
        y = target.to(z.device, torch.long).reshape(-1)
        keep = y >= 0
        if not bool(keep.any()):
            return z.sum() * 0.0, 0
        loss = F.cross_entropy(z[keep], y[keep], reduction="sum")
        return loss, int(keep.sum())
    if kind == "regression":
        y = target.to(z.device, torch.float32).reshape(z.shape)
        keep = ~torch.isnan(y)
        if not bool(keep.any()):
            return z.sum() * 0.0, 0
        if regression_loss == "huber":
            loss = F.huber_loss(z[keep], y[keep], reduction="sum", delta=huber_delta)
        elif regression_loss == "mse":
            loss = F.mse_loss(z[keep], y[keep], reduction="sum")
        else:
            raise ValueError(f"regression loss {regression_loss!r}: expected mse or huber")
        return loss, int(keep.sum())
    raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")
