"""Time masking of wav2vec 2.0: `compute_mask_indices` (fairseq's "static" algorithm).

The algorithm, for a batch of B rows of T frames, `mask_prob` p, span length L, `min_masks` m:

1. Number of spans for the batch: n = max(m, int(p * T / L + u)), u ~ U[0, 1) drawn once per
   batch (p=0.65, L=10, T=156: n = 10 or 11). A row with padding uses its own unpadded length
   Tᵢ and its own draw instead.
2. Per row, n span starts are drawn *without replacement* from [0, Tᵢ - L) (if that range has no
   more than n slots, the range is widened to Tᵢ - n - 1 as fairseq does); each start masks L
   consecutive frames; overlaps are unioned and frames beyond Tᵢ are discarded.
3. Every row is randomly subsampled (without replacement) down to the batch minimum count M, so
   all rows mask exactly M frames (required by the (B, M, C) gather of the targets).

For T = 156 and 128 rows, M averages about 55 (~35 % of frames). Randomness comes from a numpy
Generator; by default it is seeded from torch's generator so `torch.manual_seed` makes masks
reproducible.
"""

from __future__ import annotations

import numpy as np
import torch


def compute_mask_indices(
    shape: tuple[int, int],
    padding_mask: torch.Tensor | np.ndarray | None,
    mask_prob: float,
    mask_length: int,
    min_masks: int = 0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Bool (B, T) mask with the same number of True entries in every row (see module doc)."""
    bsz, all_sz = shape
    if rng is None:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
    if padding_mask is not None:
        pad = (
            padding_mask.detach().cpu().numpy()
            if isinstance(padding_mask, torch.Tensor)
            else np.asarray(padding_mask)
        )
        sizes = all_sz - pad.astype(np.int64).sum(axis=1)
    else:
        sizes = np.full(bsz, all_sz, dtype=np.int64)

    def n_spans(sz: int) -> int:
        return max(min_masks, int(mask_prob * sz / float(mask_length) + rng.random()))

    all_num = n_spans(all_sz)
    rows = []
    for i in range(bsz):
        sz = int(sizes[i])
        num = all_num if padding_mask is None else n_spans(sz)
        min_len = mask_length
        if sz - min_len <= num:
            min_len = sz - num - 1
        if sz - min_len <= 0 or num <= 0:
            rows.append(np.zeros(0, dtype=np.int64))
            continue
        starts = rng.choice(sz - min_len, num, replace=False)
        idx = (starts[:, None] + np.arange(mask_length)[None, :]).reshape(-1)
        rows.append(np.unique(idx[idx < sz]))

    keep = min(len(r) for r in rows)
    mask = np.zeros((bsz, all_sz), dtype=bool)
    for i, idx in enumerate(rows):
        if len(idx) > keep:
            idx = rng.choice(idx, keep, replace=False)
        mask[i, idx] = True
    return mask
