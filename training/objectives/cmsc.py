"""CMSC: contrastive multi-segment coding between the two adjacent 5 s segments of a pair
(fairseq-signals `Wav2Vec2CMSCModel` + `Wav2Vec2WithCMSCCriterion`, docs/method.md §3.4).

The representation is the transformer output of the *masked* forward pass, mean-pooled over
time and L2-normalised with a detached norm; there is no projection head. With A the first
segments and B the second segments of the P pairs, S = A B^T / temp and

    L = 1/2 * mean_{(i,j) in Pos} -log softmax_row(S)_ij
      + 1/2 * mean_{(j,i) in Pos^T} -log softmax_row(S^T)_ji

where Pos_ij = [group(A_i) == group(B_j)]: the diagonal, plus every other pair of the same
group (multi-positive). Negatives are the other pairs on the same process unless
`all_gather=True`, which gathers the embeddings of all DDP ranks with a gradient-correct
all-gather (off in the paper, docs/method.md §8 item 12).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def mean_pool(frames: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """Mean over time of (B, T, D) frames; padded frames (padding_mask True) are left out."""
    if padding_mask is None or not bool(padding_mask.any()):
        return frames.mean(dim=1)
    keep = (~padding_mask).unsqueeze(-1).to(frames.dtype)
    return (frames * keep).sum(1) / keep.sum(1).clamp(min=1.0)


def l2_normalize(h: Tensor, eps: float = 1e-8) -> Tensor:
    """h / max(||h||, eps) row-wise, with the norm detached (no gradient through it)."""
    norm = h.norm(dim=-1, keepdim=True).detach().clamp(min=eps)
    return h / norm


def pair_views(h: Tensor, segment: Tensor, group: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(A, B, group_A, group_B): rows with segment 0 and rows with segment 1, in pair order."""
    first, second = segment == 0, segment == 1
    if int(first.sum()) != int(second.sum()) or int(first.sum()) + int(second.sum()) != len(
        segment
    ):
        raise ValueError(
            "CMSC needs a pair batch: as many segment-0 rows as segment-1 rows "
            f"and nothing else, got segment ids {segment.tolist()[:16]}..."
        )
    return h[first], h[second], group[first], group[second]


def _positive_nll(logits: Tensor, positives: Tensor) -> Tensor:
    """Sum of -log softmax_row(logits) over the positive entries."""
    return -(F.log_softmax(logits.float(), dim=1)[positives]).sum()


def cmsc_loss(
    h: Tensor, segment: Tensor, group: Tensor, temperature: float = 0.1, all_gather: bool = False
) -> Tensor:
    """The symmetric multi-positive CMSC loss on L2-normalised embeddings `h` (2P, D).

    `segment` (2P,) is the position within the pair (0/1), `group` (2P,) an int64 id equal for
    segments of one patient/record. Without all-gather the result is this process's loss.
    With `all_gather=True` (inside an initialised process group) every rank gets its share of
    the loss over the gathered batch: its own A rows against all B, its own B rows against
    all A, divided by the global number of positives. The shares sum over ranks to the
    single-process loss on the concatenated batch, and their gradients (the all-gather's
    backward sums over ranks) are those of that loss.
    """
    with torch.autocast(device_type=h.device.type, enabled=False):  # fp32 logits under bf16
        return _cmsc_loss(h.float(), segment, group, temperature, all_gather)


def _cmsc_loss(
    h: Tensor, segment: Tensor, group: Tensor, temperature: float, all_gather: bool
) -> Tensor:
    a, b, ga, gb = pair_views(h, segment, group)
    if (
        not all_gather
        or not (dist.is_available() and dist.is_initialized())
        or dist.get_world_size() == 1
    ):
        logits = a @ b.t() / temperature
        pos = ga.unsqueeze(1) == gb.unsqueeze(0)
        n_pos = pos.sum()
        return 0.5 * (_positive_nll(logits, pos) + _positive_nll(logits.t(), pos.t())) / n_pos
    a_all, b_all = _gather_pairs(a, b)
    ga_all, gb_all = _gather_no_grad(ga), _gather_no_grad(gb)
    pos_rows = ga.unsqueeze(1) == gb_all.unsqueeze(0)  # own A vs all B
    pos_cols = gb.unsqueeze(1) == ga_all.unsqueeze(0)  # own B vs all A
    n_pos = (ga_all.unsqueeze(1) == gb_all.unsqueeze(0)).sum()
    rows = _positive_nll(a @ b_all.t() / temperature, pos_rows)
    cols = _positive_nll(b @ a_all.t() / temperature, pos_cols)
    return 0.5 * (rows + cols) / n_pos


class _AllGatherRows(torch.autograd.Function):
    """Concatenate every rank's rows (sizes may differ); backward sums the incoming gradient
    over ranks and returns this rank's slice, so every rank's loss reaches every input."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], rank: int) -> Tensor:
        padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        bufs = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(bufs, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([buf[:n] for buf, n in zip(bufs, sizes, strict=True)], dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    mine = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


def _gather_pairs(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """All ranks' A and B rows (one collective, so the backward order is the same on every
    rank), in rank order."""
    p = a.shape[0]
    sizes = _gather_sizes(2 * p, a.device)
    both = _AllGatherRows.apply(torch.cat([a, b], 0), sizes, dist.get_rank())
    a_parts, b_parts, start = [], [], 0
    for n in sizes:
        a_parts.append(both[start : start + n // 2])
        b_parts.append(both[start + n // 2 : start + n])
        start += n
    return torch.cat(a_parts), torch.cat(b_parts)


def _gather_no_grad(t: Tensor) -> Tensor:
    sizes = _gather_sizes(t.shape[0], t.device)
    padded = t.new_zeros((max(sizes),) + tuple(t.shape[1:]))
    padded[: t.shape[0]] = t
    bufs = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(bufs, padded)
    return torch.cat([buf[:n] for buf, n in zip(bufs, sizes, strict=True)])


def cmsc_embeddings(net_output: dict, eps: float = 1e-8) -> Tensor:
    """Mean-pooled, L2-normalised frames of the masked pass (`frames` (B, T, D) and optional
    `padding_mask` of the model output)."""
    frames = net_output["frames"].float()
    return l2_normalize(mean_pool(frames, net_output.get("padding_mask")), eps)
