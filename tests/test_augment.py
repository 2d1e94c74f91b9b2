"""Random lead masking: drop rates, independence between segments, absent leads, the
conditional variant, seeding and bad options."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.augment import RandomLeadMasking


def _ones(n, t=8):
    return np.ones((n, 12, t), dtype=np.float32), np.ones((n, 12), dtype=bool)


def test_random_mode_drops_each_lead_with_probability_half():
    n = 4000
    x, mask = _ones(n)
    out, keep = RandomLeadMasking("random", 0.5)(x, mask, np.random.default_rng(0))
    # rows are zero exactly where the returned mask says absent
    assert np.array_equal(out.any(axis=2), keep)
    assert np.all(out[keep] == 1.0)
    sigma = math.sqrt(n * 0.25)
    dropped = (~keep).sum(axis=0)
    assert np.all(np.abs(dropped - n / 2) < 5 * sigma), dropped
    # leads are dropped independently: pairwise co-drop rate ~ 1/4
    co = ((~keep[:, 0]) & (~keep[:, 7])).sum()
    assert abs(co - n / 4) < 5 * math.sqrt(n * 0.25 * 0.75)
    assert x.min() == 1.0  # the input is not modified


def test_pair_segments_get_independent_masks():
    n_pairs = 2000
    x, mask = _ones(2 * n_pairs)
    _, keep = RandomLeadMasking()(x, mask, np.random.default_rng(1))
    first, second = keep[0::2], keep[1::2]
    same = (first == second).all(axis=1).mean()
    assert same < 0.01  # identical 12-lead masks happen with probability 2^-12
    agree = (first == second).mean()  # per lead, independent halves agree half the time
    assert abs(agree - 0.5) < 5 * math.sqrt(0.25 / (n_pairs * 12))


def test_absent_leads_stay_absent():
    x, mask = _ones(500)
    x[:, [2, 9]] = 0.0
    mask[:, [2, 9]] = False
    out, keep = RandomLeadMasking("random", 0.5)(x, mask, np.random.default_rng(2))
    assert not keep[:, [2, 9]].any()
    assert np.all(out[:, [2, 9]] == 0)
    assert keep[:, 0].mean() > 0.4  # present leads still survive about half the time
    out0, keep0 = RandomLeadMasking("random", 0.0)(x, mask, np.random.default_rng(2))
    assert np.array_equal(keep0, mask) and np.array_equal(out0, x)


def test_conditional_mode_drops_exact_counts():
    x, mask = _ones(300)
    out, keep = RandomLeadMasking("conditional", condition=(4, 5))(
        x, mask, np.random.default_rng(3)
    )
    assert np.all((~keep[:, :6]).sum(1) == 4)
    assert np.all((~keep[:, 6:]).sum(1) == 5)
    assert np.array_equal(out.any(axis=2), keep)
    # the dropped limb leads vary: every limb lead is dropped sometimes, never always
    rate = (~keep[:, :6]).mean(0)
    assert np.all(rate > 0.4) and np.all(rate < 0.95)
    _, keep2 = RandomLeadMasking("conditional", condition=(0, 6))(x, mask, np.random.default_rng(3))
    assert keep2[:, :6].all() and not keep2[:, 6:].any()


def test_seeded_and_validated():
    x, mask = _ones(50)
    rlm = RandomLeadMasking()
    a = rlm(x, mask, np.random.default_rng(9))[1]
    b = rlm(x, mask, np.random.default_rng(9))[1]
    c = rlm(x, mask, np.random.default_rng(10))[1]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="rlm_mode"):
        RandomLeadMasking("leads")
    with pytest.raises(ValueError, match="rlm_prob"):
        RandomLeadMasking(prob=1.5)
    with pytest.raises(ValueError, match="rlm_condition"):
        RandomLeadMasking("conditional", condition=(7, 1))
    with pytest.raises(ValueError, match="12"):
        rlm(np.ones((2, 6, 8), np.float32), np.ones((2, 6), bool), np.random.default_rng(0))
