"""Random lead masking (RLM), the only lead-agnostic mechanism of the method (fairseq-signals
`RandomLeadsMask`, docs/method.md §4).

Applied per 5 s segment on the CPU, training splits only; the two segments of a pair get
independent masks because every segment draws its own values. A zeroed lead's whole row is set
to 0 and it is reported absent in the returned lead mask; leads that were already absent stay
absent (their rows are zero too).

Modes (original option `mask_leads_selection`):
* `random`: each lead is dropped independently with probability `prob` (`mask_leads_prob`,
  0.5); nothing keeps at least one lead (all 12 go with probability 2^-12), as in the original.
* `conditional`: drop exactly n1 of the 6 limb leads (I..aVF) and n2 of the 6 chest leads
  (V1..V6), (n1, n2) = `condition` (`mask_leads_condition`, default (4, 5)), chosen uniformly
  without replacement among all 6 positions. The original's conditional mode is broken
  (docs/method.md §8 item 9); this is what it was meant to do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ecgplat.store import N_LEADS

LIMB = np.arange(0, 6)
CHEST = np.arange(6, 12)


class RandomLeadMasking:
    """`rlm(x, lead_mask, rng) -> (x_masked, lead_mask_out)` for x float (N, 12, T), lead_mask
    bool (N, 12) and a `numpy.random.Generator`; inputs are not modified."""

    def __init__(self, mode: str = "random", prob: float = 0.5, condition: Sequence[int] = (4, 5)):
        if mode not in ("random", "conditional"):
            raise ValueError(f"rlm_mode: '{mode}' is not one of random, conditional")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"rlm_prob: must lie in [0, 1], got {prob}")
        n1, n2 = (int(c) for c in condition)
        if not (0 <= n1 <= 6 and 0 <= n2 <= 6):
            raise ValueError(f"rlm_condition: expected two counts in 0..6, got {list(condition)}")
        self.mode, self.prob, self.condition = mode, float(prob), (n1, n2)

    def drop_mask(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """bool (n, 12): True where a lead is dropped."""
        if self.mode == "random":
            return rng.random((n, N_LEADS)) < self.prob
        n1, n2 = self.condition
        drop = np.zeros((n, N_LEADS), dtype=bool)
        for i in range(n):
            drop[i, rng.choice(LIMB, size=n1, replace=False)] = True
            drop[i, rng.choice(CHEST, size=n2, replace=False)] = True
        return drop

    def __call__(
        self, x: np.ndarray, lead_mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        if x.ndim != 3 or x.shape[1] != N_LEADS:
            raise ValueError(f"RLM expects (N, 12, T) segments, got shape {tuple(x.shape)}")
        keep = np.asarray(lead_mask, dtype=bool) & ~self.drop_mask(x.shape[0], rng)
        out = np.where(keep[:, :, None], x, np.zeros((), dtype=x.dtype))
        return out, keep

    @classmethod
    def from_config(cls, data_cfg) -> RandomLeadMasking | None:
        """From the `data` section of a RunConfig; None when `data.rlm` is off."""
        if not data_cfg.rlm:
            return None
        return cls(data_cfg.rlm_mode, data_cfg.rlm_prob, tuple(data_cfg.rlm_condition))
