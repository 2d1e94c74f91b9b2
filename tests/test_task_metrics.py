"""Metrics of every task kind against scikit-learn / numpy, threshold fitting on a hand-made case,
ECE by hand, and patient-bootstrap intervals that cover a known population value."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from training.task_metrics import (
    classification_metrics,
    expected_calibration_error,
    fit_threshold,
    patient_bootstrap,
    regression_metrics,
    report_with_intervals,
)


def _data(n=300, c=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.random((n, c)) < np.array([0.1, 0.3, 0.5, 0.05])[:c]
    p = np.clip(0.35 * y + rng.random((n, c)) * 0.65, 0, 1)
    return y, p


def test_multilabel_metrics_match_sklearn():
    y, p = _data()
    t = [0.4, 0.5, 0.6, 0.3]
    m = classification_metrics("multilabel", y, p, t, list("abcd"))
    assert m["auroc_macro"] == pytest.approx(skm.roc_auc_score(y, p, average="macro"), abs=1e-12)
    assert m["auroc_micro"] == pytest.approx(skm.roc_auc_score(y, p, average="micro"), abs=1e-12)
    ap_macro = skm.average_precision_score(y, p, average="macro")
    assert m["auprc_macro"] == pytest.approx(ap_macro, abs=1e-12)
    ap_micro = skm.average_precision_score(y, p, average="micro")
    assert m["auprc_micro"] == pytest.approx(ap_micro, abs=1e-12)
    pred = p >= np.array(t)
    for k, row in enumerate(m["per_class"]):
        assert row["f1"] == pytest.approx(skm.f1_score(y[:, k], pred[:, k]), abs=1e-12)
        assert row["sensitivity"] == pytest.approx(skm.recall_score(y[:, k], pred[:, k]))
        spec = skm.recall_score(~y[:, k], ~pred[:, k])
        assert row["specificity"] == pytest.approx(spec)
        assert row["threshold"] == t[k]
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"), abs=1e-12)


def test_binary_and_multiclass_match_sklearn():
    y, p = _data(c=1)
    m = classification_metrics("binary", y, p, [0.45], ["pos"])
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y[:, 0], p[:, 0]), abs=1e-12)
    pred = p[:, 0] >= 0.45
    assert m["f1"] == pytest.approx(skm.f1_score(y[:, 0], pred))
    assert "auroc_macro" not in m
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[idx]
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m = classification_metrics("multiclass", idx, prob, None, list("xyz"))
    auc = skm.roc_auc_score(idx, prob, multi_class="ovr", average="macro")
    assert m["auroc_macro"] == pytest.approx(auc, abs=1e-12)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(idx, prob.argmax(1)))
    assert m["confusion_matrix"] == skm.confusion_matrix(idx, prob.argmax(1)).tolist()
    f1 = skm.f1_score(idx, prob.argmax(1), average="macro")
    assert m["f1_macro"] == pytest.approx(f1, abs=1e-12)


def test_regression_metrics_match_numpy():
    rng = np.random.default_rng(2)
    y = rng.normal(60, 12, (80, 2))
    v = y + rng.normal(0, 5, (80, 2))
    m = regression_metrics(y, v, ["age", "ef"])
    for k, row in enumerate(m["per_target"]):
        err = v[:, k] - y[:, k]
        assert row["mae"] == pytest.approx(np.abs(err).mean(), rel=1e-12)
        assert row["rmse"] == pytest.approx(np.sqrt((err**2).mean()), rel=1e-12)
        assert row["r2"] == pytest.approx(skm.r2_score(y[:, k], v[:, k]), rel=1e-12)
        assert row["pearson_r"] == pytest.approx(np.corrcoef(y[:, k], v[:, k])[0, 1], rel=1e-9)
    assert m["mae"] == m["per_target"][0]["mae"]


def test_thresholds_on_a_hand_made_case():
    s = np.array([0.1, 0.3, 0.35, 0.4, 0.8, 0.9])
    y = np.array([0, 0, 1, 0, 1, 1], dtype=bool)
    # F1 by threshold (descending midpoints): 0.85 -> 1/2, 0.6 -> 4/5, 0.375 -> 4/6,
    # 0.325 -> 6/7 (best), 0.2 -> 6/8; Youden: 0.6 -> 2/3 - 0 and 0.325 -> 1 - 1/3, a tie that
    # goes to the higher threshold
    assert fit_threshold(y, s, "max_f1") == pytest.approx(0.325)
    assert fit_threshold(y, s, "youden") == pytest.approx(0.6)
    assert fit_threshold(y, s, "fixed") == 0.5
    assert fit_threshold(np.zeros(6, bool), s, "max_f1") == 0.5  # one label value: no fit


def test_ece_by_hand():
    conf = np.array([0.05, 0.15, 0.15, 0.95, 0.95])
    hit = np.array([0, 1, 0, 1, 1])
    ece, curve = expected_calibration_error(hit, conf, bins=10)
    # bins 0 (0.05 vs 0), 1 (0.15 vs 0.5), 9 (0.95 vs 1): weights 1/5, 2/5, 2/5
    assert ece == pytest.approx(0.2 * 0.05 + 0.4 * 0.35 + 0.4 * 0.05)
    assert curve["count"][:2] == [1, 2] and curve["frequency"][5] is None


def test_patient_bootstrap_covers_the_population_value_and_clusters():
    """Errors = patient effect + row noise, N(0, 1) in all: the population MAE is sqrt(2/pi).
    Over 20 data sets the 95 % patient interval covers it nearly always, and it is wider than
    an interval that resamples rows as if they were independent (3 rows per patient, ICC
    0.64: about 1.5 times)."""
    truth = math.sqrt(2 / math.pi)
    covered, widths = 0, {"patient": [], "row": []}
    for seed in range(20):
        rng = np.random.default_rng(seed)
        patients = np.repeat(np.arange(150), 3)
        err = rng.normal(0, 0.8, 150)[patients] + rng.normal(0, 0.6, len(patients))
        y = np.zeros((len(err), 1))
        v = err[:, None]
        report = report_with_intervals("regression", y, v, patients.astype(str), n_boot=300)
        lo, hi = report["ci95"]["mae"]
        covered += lo <= truth <= hi
        widths["patient"].append(hi - lo)
        row = patient_bootstrap(
            lambda r, y=y, v=v: regression_metrics(y[r], v[r]),
            np.arange(len(err)),
            ("mae",),
            300,
        )["mae"]
        assert row is not None
        widths["row"].append(row[1] - row[0])
    assert covered >= 17, covered
    assert np.mean(widths["patient"]) > 1.3 * np.mean(widths["row"])
