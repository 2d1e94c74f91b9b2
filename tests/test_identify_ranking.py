"""Identification ranking without full sorts (`rank_statistics`) against an independent full
stable sort, sklearn's AP and the neighbour-matrix metrics; the probe budget's sample and band."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

import training.ident_metrics as im
from retrieval.evaluate import probe_sample
from training.ident_metrics import (
    average_precision,
    cmc_curve,
    nearest,
    rank1_band,
    rank_statistics,
)


def _quantized_cohort(rng, patients, per_patient, probes, dim=8):
    """Features on a 1/4 grid: every dot product is exact in float32 whatever the summation
    order, so equal scores are exact ties; a few gallery rows are duplicated (more ties) and some
    probes belong to patients without gallery items."""
    g_lab = np.repeat(np.arange(patients), per_patient)
    gal = rng.integers(-2, 3, size=(len(g_lab), dim)) / 4
    dup = rng.choice(len(gal), size=len(gal) // 4, replace=False)
    gal[dup] = gal[rng.permutation(dup)]
    p_lab = rng.integers(0, patients + 3, size=probes)  # labels >= patients: no gallery item
    prb = rng.integers(-2, 3, size=(probes, dim)) / 4
    return gal, g_lab, prb, p_lab


def _brute_force(gal, g_lab, prb, p_lab, tie_lower_row_first=True):
    """CMC (full depth) and AP per probe from a full stable argsort of float64 scores."""
    sim = prb @ gal.T
    if tie_lower_row_first:
        order = np.argsort(-sim, axis=1, kind="stable")
    else:
        order = len(gal) - 1 - np.argsort(-sim[:, ::-1], axis=1, kind="stable")
    hits = g_lab[order] == p_lab[:, None]
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), len(gal))
    cmc = np.array([np.mean(first < k) for k in range(1, len(gal) + 1)])
    ap = np.full(len(prb), np.nan)
    for i, h in enumerate(hits):
        pos = np.flatnonzero(h) + 1
        if len(pos):
            ap[i] = np.mean(np.arange(1, len(pos) + 1) / pos)
    return cmc, ap


@pytest.mark.parametrize("seed", range(6))
def test_rank_statistics_equal_a_full_stable_sort_with_exact_ties(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    gal, g_lab, prb, p_lab = _quantized_cohort(rng, patients=12, per_patient=4, probes=40)
    cmc_ref, ap_ref = _brute_force(gal, g_lab, prb, p_lab)
    cmc_other, ap_other = _brute_force(gal, g_lab, prb, p_lab, tie_lower_row_first=False)
    # the cohort's ties decide ranks: the other tie rule scores differently
    assert not (np.allclose(cmc_ref, cmc_other) and np.allclose(ap_ref, ap_other, equal_nan=True))
    assert np.isnan(ap_ref).any() and not np.isnan(ap_ref).all()
    for chunk in (1, 7, 1024):
        cmc, ap = rank_statistics(gal, prb, g_lab, p_lab, chunk=chunk)
        assert np.abs(cmc - cmc_ref).max() <= 1e-12
        assert (np.isnan(ap) == np.isnan(ap_ref)).all()
        assert np.nanmax(np.abs(ap - ap_ref)) <= 1e-12
    # a block bounded by the similarity budget (3 probes at a time) and a shorter CMC
    monkeypatch.setattr(im, "BLOCK_ELEMENTS", 3 * len(gal))
    cmc, ap = rank_statistics(gal, prb, g_lab.astype(str), p_lab.astype(str), depth=20)
    assert len(cmc) == 20 and np.abs(cmc - cmc_ref[:20]).max() <= 1e-12
    assert np.nanmax(np.abs(ap - ap_ref)) <= 1e-12


class _RowsOnDemand:
    """A gallery read like a stored feature set: row slices only, each read's size recorded."""

    def __init__(self, x):
        self.x, self.shape, self.reads = x, x.shape, []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        assert isinstance(key, slice) and key.step is None
        part = self.x[key].copy()
        self.reads.append(len(part))
        return part


@pytest.mark.parametrize("part", [1, 7, 16])
def test_rank_statistics_stream_the_gallery_in_bounded_parts(part, monkeypatch):
    rng = np.random.default_rng(20 + part)
    gal, g_lab, prb, p_lab = _quantized_cohort(rng, patients=15, per_patient=4, probes=30)
    cmc_ref, ap_ref = _brute_force(gal, g_lab, prb, p_lab)
    monkeypatch.setattr(im, "GALLERY_CHUNK", part)
    rows = _RowsOnDemand(gal)
    cmc, ap = rank_statistics(rows, prb, g_lab, p_lab, chunk=4)
    assert np.abs(cmc - cmc_ref).max() <= 1e-12
    assert (np.isnan(ap) == np.isnan(ap_ref)).all()
    assert np.nanmax(np.abs(ap - ap_ref)) <= 1e-12
    # each row read once per pass, never more than one part at a time
    assert max(rows.reads) == part and sum(rows.reads) == 2 * len(gal)
    bad = gal.copy()
    bad[-1, 0] = np.nan  # in the last part only
    with pytest.raises(ValueError, match="NaN"):
        rank_statistics(_RowsOnDemand(bad), prb, g_lab, p_lab)


def test_rank_statistics_equal_the_neighbour_matrix_metrics():
    rng = np.random.default_rng(11)
    gal, g_lab, prb, p_lab = _quantized_cohort(rng, patients=20, per_patient=3, probes=50)
    rows = nearest(gal, prb, k=len(gal), chunk=9)  # full stable ranking, ties to the lower row
    cmc, ap = rank_statistics(gal, prb, g_lab, p_lab, chunk=9)
    assert np.abs(cmc - cmc_curve(rows, g_lab, p_lab)).max() <= 1e-12
    ref = average_precision(rows, g_lab, p_lab)
    assert (np.isnan(ap) == np.isnan(ref)).all() and np.nanmax(np.abs(ap - ref)) <= 1e-12


def test_ap_equals_sklearn_on_probes_without_near_ties():
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(25, 32))
    g_lab = np.repeat(np.arange(25), 4)
    p_lab = np.repeat(np.arange(25), 3)
    gal = centres[g_lab] + 1.4 * rng.normal(size=(len(g_lab), 32))
    prb = centres[p_lab] + 1.4 * rng.normal(size=(len(p_lab), 32))
    gal /= np.linalg.norm(gal, axis=1, keepdims=True)
    prb /= np.linalg.norm(prb, axis=1, keepdims=True)
    gal, prb = gal.astype(np.float32), prb.astype(np.float32)
    cmc, ap = rank_statistics(gal, prb, g_lab, p_lab, chunk=16)
    sim = prb.astype(np.float64) @ gal.T.astype(np.float64)
    # sklearn applies where float32 rounding cannot reorder scores: no two within 1e-5
    gaps = np.diff(np.sort(sim, axis=1), axis=1).min(axis=1)
    clear = gaps > 1e-5
    assert clear.mean() > 0.7
    ref = [average_precision_score(g_lab == p, s) for p, s in zip(p_lab, sim, strict=True)]
    assert np.abs(ap[clear] - np.asarray(ref)[clear]).max() <= 1e-12
    assert 0.2 < ap.mean() < 0.9 and 0.1 < cmc[0] < 0.9  # a non-trivial case


def test_rank_statistics_refuses_bad_inputs():
    gal = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="must be"):
        rank_statistics(gal, np.zeros((2, 5)), [0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="one label"):
        rank_statistics(gal, np.zeros((2, 4)), [0, 1], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        rank_statistics(gal, np.full((2, 4), np.nan), [0, 1, 2], [0, 1])


def test_probe_sample_is_seeded_uniform_and_all_under_the_budget():
    a = probe_sample(1000, 30, seed=4)
    assert len(a) == 30 and (np.diff(a) > 0).all() and a.min() >= 0 and a.max() < 1000
    assert np.array_equal(a, probe_sample(1000, 30, seed=4))
    assert not np.array_equal(a, probe_sample(1000, 30, seed=5))
    for budget in (0, 1000, 5000):
        assert np.array_equal(probe_sample(1000, budget), np.arange(1000))
    counts = np.bincount(
        np.concatenate([probe_sample(50, 10, seed=s) for s in range(2000)]), minlength=50
    )
    assert counts.sum() == 20_000 and counts.min() > 300 and counts.max() < 500  # mean 400
    with pytest.raises(ValueError, match="max_probes must be >= 0"):
        probe_sample(10, -1)


def test_rank1_band_is_the_95_percent_binomial_half_width():
    assert rank1_band(0.5, 100, 10**12) == pytest.approx(1.96 * 0.05)
    assert rank1_band(0.3, 50, 200) == pytest.approx(1.96 * np.sqrt(0.21 / 50 * 150 / 199))
    assert rank1_band(0.4, 80, 80) == 0.0  # every probe evaluated: no sampling error
    assert np.isnan(rank1_band(0.4, 0, 80))


def test_cli_default_budget_is_the_library_default():
    import inspect

    from ecgplat.cli.retrieval_cmds import evaluate_identify
    from retrieval.evaluate import MAX_PROBES

    params = inspect.signature(evaluate_identify).parameters
    assert params["max_probes"].default == MAX_PROBES and params["seed"].default == 0
