"""ArcFace (additive angular margin) head and loss for patient identification.

Mirrors fairseq-signals' `arcface` model head and `arcface` criterion (docs/method.md §6.1):

* class weights `kernel` of shape (N, D), one row per training class; every use normalises
  the rows, so logits are cosines between the L2-normalised embedding and the class centres;
* the target-class logit gets the angular margin: cos(θ + m) while θ + m stays below π
  (cos θ > cos(π − m)), otherwise the monotone fallback cos θ − m·sin m;
* all logits are scaled by s and fed to a summed cross-entropy; sample size = batch size;
* training "accuracy" is argmax over the *unmargined* cosines.

Deviation from the original (a bug fix, docs/method.md §8 item 15): sin θ is computed as
sqrt(clamp(1 − cos²θ, eps)) so the gradient stays finite at |cos θ| = 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SIN_EPS = 1e-6


class ArcFaceHead(nn.Module):
    """Class-centre kernel plus the margin-logit computation.

    Args:
        embed_dim: embedding width D (the encoder's `encoder_embed_dim`).
        num_classes: number of training classes N (the original's `model.num_labels`).
        scale: logit scale s (the original's `criterion.scale`; paper config 192).
        margin: additive angular margin m in radians (`criterion.margin`; paper config 1.0).
    """

    def __init__(self, embed_dim: int, num_classes: int, scale: float = 192.0, margin: float = 1.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"ArcFace needs at least one class, got {num_classes}")
        self.scale = float(scale)
        self.margin = float(margin)
        self.kernel = nn.Parameter(torch.empty(num_classes, embed_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The original draws U(-1, 1) and then calls renorm_(2, dim=1, 1e-5).mul_(1e5) on its
        # (classes x emb) kernel: with torch semantics that normalises each *column* (feature
        # dimension), a leftover of insightface's (emb x classes) layout. It is reproduced for
        # fidelity; it has no effect on the logits because rows are normalised whenever used.
        with torch.no_grad():
            self.kernel.uniform_(-1.0, 1.0)
            self.kernel.renorm_(2, 1, 1e-5).mul_(1e5)

    @property
    def num_classes(self) -> int:
        return self.kernel.shape[0]

    def cosine(self, embedding: torch.Tensor) -> torch.Tensor:
        """cos θ (B, N) between L2-normalised embeddings and normalised class rows, in float32."""
        # outside autocast: at s = 192 a bf16 cosine (3 significant digits) would move logits by ~1
        with torch.autocast(device_type=embedding.device.type, enabled=False):
            e = F.normalize(embedding.float(), dim=-1)
            w = F.normalize(self.kernel.float(), dim=-1)
            return (e @ w.t()).clamp(-1.0, 1.0)

    def margin_logits(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits s·[cos θ_j, with the target column replaced by its margin version]."""
        return self.scale * apply_margin(cosine, labels, self.margin)

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.margin_logits(self.cosine(embedding), labels)


def apply_margin(cosine: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Replace each row's target cosine by cos(θ + m) (or cos θ − m·sin m past the threshold)."""
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    threshold = math.cos(math.pi - margin)
    fallback_offset = margin * sin_m
    target = cosine.gather(1, labels.view(-1, 1))
    sine = torch.sqrt(torch.clamp(1.0 - target * target, min=SIN_EPS))
    with_margin = target * cos_m - sine * sin_m
    target_logit = torch.where(target > threshold, with_margin, target - fallback_offset)
    return cosine.scatter(1, labels.view(-1, 1), target_logit)


def arcface_loss(
    head: ArcFaceHead, embedding: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, int, dict]:
    """(cross-entropy summed over the batch, sample size B, {"accuracy": top-1 over cos θ})."""
    labels = labels.long()
    cosine = head.cosine(embedding)
    logits = head.margin_logits(cosine, labels)
    loss = F.cross_entropy(logits, labels, reduction="sum")
    with torch.no_grad():
        correct = (cosine.argmax(dim=1) == labels).sum().item()
    n = int(labels.shape[0])
    return loss, n, {"accuracy": correct / max(n, 1)}
