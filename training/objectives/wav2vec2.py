"""The wav2vec 2.0 pretraining terms: negative sampling, contrastive (InfoNCE) logits and loss,
the codebook diversity term and the logged accuracy (fairseq-signals' `Wav2Vec2Model`
`sample_negatives` / `compute_preds` and `Wav2Vec2Criterion`, docs/method.md §3.2-3.3).

Shapes: `x` context vectors (B, M, F) = final_proj at the M masked frames of each sample,
`y` targets (B, M, F) = project_q(quantized) at the same frames. Every sample of a batch has
the same number M of masked frames (the masking keeps the count equal across the batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def negative_indices(
    bsz: int, m: int, num_negatives: int, generator: torch.Generator | None, device
) -> Tensor:
    """The (B, M, N) within-sample frame indices of `sample_negatives` (same random draws):
    uniform over the sample's other masked frames, never the frame itself."""
    if num_negatives == 0:
        return torch.zeros((bsz, m, 0), dtype=torch.long, device=device)
    if m < 2:
        raise ValueError(f"negative sampling needs at least 2 masked frames per sample, got {m}")
    with torch.no_grad():
        gen_device = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randint(
            0, m - 1, (bsz, m, num_negatives), generator=generator, device=gen_device
        )
        own = torch.arange(m, device=gen_device).view(1, m, 1)
        idx = idx + (idx >= own).long()
        return idx.to(device)


def sample_negatives(
    y: Tensor, num_negatives: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Draw `num_negatives` distractors per masked frame, uniformly from the *same sample's*
    other masked frames (original options `num_negatives=100`, `cross_sample_negatives=0`).

    Indices are drawn in [0, M-2] and those >= the frame's own index are shifted up by one, so
    the own frame is never drawn and the others are equally likely. Gradients flow into the
    gathered negatives (as in the original). Returns `(negatives (N, B, M, F), idx (B, M, N))`
    where `idx` holds the within-sample frame index of each negative.
    """
    bsz, m, fsz = y.shape
    idx = negative_indices(bsz, m, num_negatives, generator, y.device)
    if num_negatives == 0:
        return y.new_zeros((0, bsz, m, fsz)), idx.cpu()
    flat = idx + (torch.arange(bsz, device=y.device) * m).view(bsz, 1, 1)
    negs = y.reshape(bsz * m, fsz)[flat.reshape(-1)].view(bsz, m, num_negatives, fsz)
    return negs.permute(2, 0, 1, 3), idx


def contrastive_logits(x: Tensor, y: Tensor, negatives: Tensor, logit_temp: float) -> Tensor:
    """Cosine similarities of each context vector with its target and its negatives, divided
    by `logit_temp` (original `logit_temp=0.1`): float32 (1 + N, B, M), the positive first.

    A negative that is bit-identical to the positive (the quantizer picked the same codewords)
    gets -inf, so it is not counted against the positive.
    """
    neg_is_pos = (y.unsqueeze(0) == negatives).all(-1)  # (N, B, M)
    targets = torch.cat([y.unsqueeze(0), negatives], dim=0)
    with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 logits under bf16
        x, targets = x.float(), targets.float()
        # cosine = dot / (|x| |t|) with each norm clamped at 1e-8, as torch.cosine_similarity;
        # written out so that nothing of the (1 + N, B, M, F) size is divided (2-3x faster on CPU)
        dots = (x.unsqueeze(0) * targets).sum(-1)
        norms = x.norm(dim=-1).clamp_min(1e-8).unsqueeze(0) * targets.norm(dim=-1).clamp_min(1e-8)
        logits = dots / (norms * logit_temp)
    if neg_is_pos.any():
        logits = torch.cat([logits[:1], logits[1:].masked_fill(neg_is_pos, float("-inf"))], 0)
    return logits


def contrastive_logits_at(x: Tensor, y: Tensor, idx: Tensor, logit_temp: float) -> Tensor:
    """`contrastive_logits(x, y, negatives, logit_temp)` for the negatives y[b, idx[b, i, n]]
    (`negative_indices`), without materialising the (N, B, M, F) negatives: every cosine is an
    entry of the sample's (M, M) Gram matrix of x against y (one batched GEMM), gathered at idx,
    over the gathered norms. Same function and gradients; the dot products are summed in the
    GEMM's order (fp32 rounding-level differences). A negative bit-identical to the positive
    (same row of y) gets -inf, as there."""
    bsz, m, _ = y.shape
    n = idx.shape[-1]
    with torch.no_grad():  # row ids: equal rows of y share one (exact comparison, as ==)
        rows = torch.unique(y.detach().reshape(bsz * m, -1), dim=0, return_inverse=True)[1]
        rows = rows.view(bsz, m)
        neg_is_pos = rows.gather(1, idx.reshape(bsz, m * n)).view(bsz, m, n) == rows[..., None]
    with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 logits under bf16
        x, y = x.float(), y.float()
        gram = torch.bmm(x, y.transpose(1, 2))  # (B, M, M): x_i . y_j within each sample
        nx = x.norm(dim=-1).clamp_min(1e-8)
        ny = y.norm(dim=-1).clamp_min(1e-8)
        dots = torch.cat([gram.diagonal(dim1=1, dim2=2)[..., None], gram.gather(2, idx)], -1)
        ny_t = torch.cat([ny[..., None], ny.gather(1, idx.reshape(bsz, m * n)).view(bsz, m, n)], -1)
        logits = dots / ((nx[..., None] * ny_t) * logit_temp)  # (B, M, 1 + N)
    if bool(neg_is_pos.any()):
        logits = torch.cat(
            [logits[..., :1], logits[..., 1:].masked_fill(neg_is_pos, -math.inf)], -1
        )
    return logits.permute(2, 0, 1)


def flat_logits(logits: Tensor) -> Tensor:
    """(1 + N, B, M) logits as (B*M, 1 + N) rows whose target class is always 0."""
    return logits.permute(1, 2, 0).reshape(-1, logits.size(0))


def infonce_loss(logits: Tensor) -> Tensor:
    """Cross-entropy with target index 0, SUMMED over all B*M masked frames (`infonce: true`)."""
    rows = flat_logits(logits)
    target = torch.zeros(rows.size(0), dtype=torch.long, device=rows.device)
    return F.cross_entropy(rows, target, reduction="sum")


def infonce_accuracy(logits: Tensor) -> tuple[int, int]:
    """(correct, count) as the original logs it: a frame is correct when the positive has the
    maximum logit, except degenerate rows where argmax and argmin are both 0 (all logits
    equal); `count` is the number of frames."""
    rows = flat_logits(logits.detach())
    if rows.numel() == 0:
        return 0, 0
    is_max = rows.argmax(-1) == 0
    is_min = rows.argmin(-1) == 0
    correct = int(is_max.sum().item()) - int((is_max & is_min).sum().item())
    return correct, int(is_max.numel())


def diversity_loss(prob_perplexity: Tensor, num_vars: int) -> Tensor:
    """Codebook diversity term (G*V - prob_perplexity) / (G*V); 0 when all codewords are used
    equally."""
    return (num_vars - prob_perplexity) / num_vars


@dataclass
class Wav2Vec2Terms:
    """The wav2vec 2.0 parts of one batch: `infonce` is summed over the `sample_size` masked
    frames; `diversity` and `features_pen` are per-batch scalars (not yet weighted or scaled)."""

    infonce: Tensor
    diversity: Tensor
    features_pen: Tensor
    sample_size: int
    correct: int
    count: int


def wav2vec2_terms(
    net_output: dict,
    num_negatives: int = 100,
    logit_temp: float = 0.1,
    generator: torch.Generator | None = None,
) -> Wav2Vec2Terms:
    """All wav2vec 2.0 terms from the pretraining model's output dict (keys `x`, `y`,
    `prob_perplexity`, `num_vars`, `features_pen`)."""
    x, y = net_output["x"], net_output["y"]
    if x.shape != y.shape or x.dim() != 3:
        raise ValueError(
            f"expected x and y of equal shape (B, M, F), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    idx = negative_indices(y.shape[0], y.shape[1], num_negatives, generator, y.device)
    logits = contrastive_logits_at(x, y, idx, logit_temp)
    correct, count = infonce_accuracy(logits)
    return Wav2Vec2Terms(
        infonce=infonce_loss(logits),
        diversity=diversity_loss(net_output["prob_perplexity"], int(net_output["num_vars"])),
        features_pen=net_output["features_pen"],
        sample_size=x.shape[0] * x.shape[1],
        correct=correct,
        count=count,
    )
