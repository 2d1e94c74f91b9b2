"""A checkpoint as the plain function a deployment runs: ``(signal, lead_mask) -> outputs``.

`load_deployable(path)` rebuilds the model of any checkpoint kind, in eval mode, wrapped so that
its forward takes exactly the exported inputs and returns a tuple of tensors:

* a model with a task head (``diagnosis``, or any checkpoint whose ``task`` entry names a kind:
  ``training.tasks.heads.task_of_checkpoint``) -> `HeadGraph`: ``logits`` and ``probabilities``
  (sigmoid for binary / multilabel, softmax for multiclass), or, for regression, ``standardized``
  and ``values`` (``standardized * target_std + target_mean``);
* an identification model, a pretraining or imported checkpoint, or any checkpoint with
  ``encoder_only=True`` -> `EmbeddingGraph`: ``embedding``, the L2-normalised mean-pooled
  encoder output that ``ecgplat embed`` stores. An identification model's ArcFace head is left
  out on purpose: its classes are the training patients.

The inputs are ``signal`` (B, 12, 2500) float32 in canonical lead order, already normalised the
way the checkpoint was trained (``training.normalize``), and ``lead_mask`` (B, 12) bool (False:
the lead is absent and zeroed). Export (`training.export`) traces these wrappers and explanation
(`training.explain`) differentiates through them, so both see the same function.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.models.encoder import ECGEncoder
from training.models.identifier import unit_embedding
from training.models.pooling import pooled_output

INPUT_NAMES = ("signal", "lead_mask")
HEAD_KINDS = ("diagnosis",)  # checkpoint kinds whose model is encoder + linear `head`


class HeadGraph(nn.Module):
    """Encoder + linear head -> (raw head outputs, probabilities or de-standardised values)."""

    def __init__(self, encoder: ECGEncoder, head: nn.Linear, task: dict):
        super().__init__()
        self.encoder, self.head, self.kind = encoder, head, str(task["kind"])
        mean = task.get("target_mean") or [0.0] * head.out_features
        std = task.get("target_std") or [1.0] * head.out_features
        self.register_buffer("target_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("target_std", torch.tensor(std, dtype=torch.float32))

    @property
    def output_names(self) -> tuple[str, str]:
        if self.kind == "regression":
            return ("standardized", "values")
        return ("logits", "probabilities")

    def forward(self, signal: torch.Tensor, lead_mask: torch.Tensor):
        z = self.head(pooled_output(self.encoder, signal, lead_mask)).float()
        if self.kind == "multiclass":
            return z, torch.softmax(z, dim=-1)
        if self.kind == "regression":
            return z, z * self.target_std + self.target_mean
        return z, torch.sigmoid(z)


class EmbeddingGraph(nn.Module):
    """The bare encoder -> (unit embedding (B, D),)."""

    output_names = ("embedding",)

    def __init__(self, encoder: ECGEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, signal: torch.Tensor, lead_mask: torch.Tensor):
        return (unit_embedding(self.encoder, signal, lead_mask),)


@dataclass
class Deployable:
    """A checkpoint's model as a `HeadGraph` or `EmbeddingGraph`, with what describes it."""

    graph: HeadGraph | EmbeddingGraph
    checkpoint: Path
    sha256: str
    kind: str  # the checkpoint's kind
    task: dict | None  # task_of_checkpoint; None for an embedding graph
    normalize: str  # data.normalize applied before the model
    encoder_config: dict
    trained_leads: str | None

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.graph.output_names)


def load_deployable(path: str | os.PathLike, encoder_only: bool = False) -> Deployable:
    """The model of checkpoint `path` (any kind) as a `Deployable`, in eval mode on the CPU.
    CheckpointError naming the file when it is unusable; ValueError when its task entry is
    malformed. The file is read once (hashed, then loaded from the same bytes)."""
    from training.models.checkpoint_file import (
        CheckpointError,
        encoder_from,
        load_checkpoint_hashed,
        load_strict,
    )
    from training.normalize import mode_of

    path = Path(path)
    ckpt, sha = load_checkpoint_hashed(path)
    # feature_grad_mult=1: a frozen CNN (0, the fine-tuning default) would run under no_grad,
    # and explanation needs the gradient down to the input; the forward pass is the same
    encoder = encoder_from(ckpt, path, feature_grad_mult=1.0)
    task = None if encoder_only else _head_task(ckpt, path)
    graph: HeadGraph | EmbeddingGraph
    if task is None:
        graph = EmbeddingGraph(encoder)
    else:
        head = ckpt["model"]["head.weight"]
        model = _HeadModel(encoder, nn.Linear(head.shape[1], head.shape[0]))
        load_strict(model, ckpt["model"], path)
        if model.head.out_features != len(task["classes"]):
            raise CheckpointError(
                path,
                f"the head has {model.head.out_features} outputs, its task "
                f"{task['name']!r} names {len(task['classes'])}",
            )
        graph = HeadGraph(model.encoder, model.head, task)
    extra: dict[str, Any] = ckpt.get("extra") or {}
    return Deployable(
        graph.eval(),
        path,
        sha,
        str(ckpt["kind"]),
        task,
        mode_of(ckpt),
        dict(ckpt["encoder_config"]),
        None if extra.get("leads") is None else str(extra["leads"]),
    )


class _HeadModel(nn.Module):
    """A fine-tuned model's state-dict layout with a linear head (``encoder.*``, ``head.*``)."""

    def __init__(self, encoder: ECGEncoder, head: nn.Linear):
        super().__init__()
        self.encoder, self.head = encoder, head


def _head_task(ckpt: dict, path) -> dict | None:
    """The task of a checkpoint with a linear head, None for one without (embedding only)."""
    from training.models.checkpoint_file import CheckpointError
    from training.tasks.heads import task_of_checkpoint

    if ckpt.get("task") is None and ckpt["kind"] not in HEAD_KINDS:
        return None
    if "head.weight" not in ckpt["model"]:
        raise CheckpointError(path, "no task head (head.weight) in the model weights")
    try:
        return task_of_checkpoint(ckpt)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
