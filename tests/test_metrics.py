"""Diagnosis metrics: the CinC 2021 challenge score against hand-computed cases and an independent
loop implementation of the challenge definition, AUROC/AUPRC/F1 against scikit-learn, record
aggregation, and the `ecgplat score` command on a fixed predictions file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from typer.testing import CliRunner

from ecgplat.labels import NORMAL_INDEX, WEIGHTS, codes_to_multihot
from training import cinc_metrics as metrics

FIXTURE = Path(__file__).parent / "fixtures" / "predictions_small.npz"
WEIGHTS_CSV = Path(__file__).resolve().parents[1] / "ecgplat" / "data" / "scoring" / "weights.csv"
AF, CRBBB, IRBBB, NSR, PAC, PVC, STACH = 0, 5, 7, 14, 15, 18, 23


def multihot(*classes: int, n: int = 26) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[list(classes)] = True
    return out


# --------------------------------------------------------------- an independent reference


def reference_challenge_score(labels, outputs) -> float:
    """The challenge definition written with python sets and loops, weights read from the csv."""
    with open(WEIGHTS_CSV, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r]
    header = rows[0][1:]
    w = [[float(v) for v in r[1:]] for r in rows[1:]]
    normal = next(i for i, name in enumerate(header) if "426783006" in name.split("|"))

    def score(y_rows, o_rows):
        total = 0.0
        for y_row, o_row in zip(y_rows, o_rows, strict=True):
            true = {k for k, v in enumerate(y_row) if v}
            pred = {k for k, v in enumerate(o_row) if v}
            norm = max(1, len(true | pred))
            total += sum(w[i][j] for i in true for j in pred) / norm
        return total

    y = [list(map(bool, r)) for r in labels]
    o = [list(map(bool, r)) for r in outputs]
    inactive = [[k == normal for k in range(len(header))] for _ in y]
    observed, correct, baseline = score(y, o), score(y, y), score(y, inactive)
    return 0.0 if correct == baseline else (observed - baseline) / (correct - baseline)


def make_predictions_small(path: Path) -> None:
    """Writes the committed fixture: 30 records x 2 segments, realistic class frequencies, noisy
    probabilities correlated with the labels (run this module as a script to regenerate)."""
    rng = np.random.default_rng(2021)
    n_records, n_seg = 30, 2
    prevalence = rng.uniform(0.03, 0.3, size=26)
    prevalence[NSR] = 0.45
    rec_labels = rng.random((n_records, 26)) < prevalence
    rec_labels[:, 3] = False  # one class without positives: undefined per-class AUROC
    labels = np.repeat(rec_labels, n_seg, axis=0)
    logits = 2.5 * (labels - 0.5) + rng.normal(0, 1.6, size=labels.shape) - 0.8
    probabilities = (1 / (1 + np.exp(-logits))).astype(np.float32)
    keys = np.repeat(np.array([f"cinc2021/S{i:04d}" for i in range(n_records)]), n_seg)
    np.savez(path, labels=labels, probabilities=probabilities, record_keys=keys)


# --------------------------------------------------------------- challenge score, by hand


def test_weights_entries_used_below():
    assert NORMAL_INDEX == NSR
    expected = {
        (AF, AF): 1.0,
        (AF, PAC): 0.3375,
        (PVC, AF): 0.375,
        (PVC, PAC): 0.4625,
        (STACH, NSR): 0.375,
        (AF, PVC): 0.375,
        (AF, NSR): 0.25,
        (PVC, NSR): 0.375,
        (CRBBB, IRBBB): 0.4,
        (CRBBB, NSR): 0.35,
    }
    for (i, j), value in expected.items():
        assert WEIGHTS[i, j] == value, (i, j)


def test_perfect_predictions_score_one():
    y = np.stack([multihot(AF, PVC), multihot(NSR), multihot(STACH, IRBBB)])
    assert metrics.challenge_score(y, y) == pytest.approx(1.0)


def test_only_normal_scores_zero():
    y = np.stack([multihot(AF, PVC), multihot(NSR), multihot(STACH, IRBBB)])
    only_nsr = np.zeros_like(y)
    only_nsr[:, NSR] = True
    assert metrics.challenge_score(y, only_nsr) == pytest.approx(0.0)


def test_zero_when_labels_are_the_inactive_outputs():
    y = np.stack([multihot(NSR), multihot(NSR)])
    assert metrics.challenge_score(y, np.stack([multihot(AF), multihot(NSR)])) == 0.0


def test_equivalent_class_pair():
    # RBBB (59118001) and CRBBB (713427006) are one scored class.
    rbbb = codes_to_multihot(["59118001"])
    assert np.flatnonzero(rbbb).tolist() == [CRBBB]
    y = np.stack([rbbb, rbbb])
    o = np.stack([codes_to_multihot(["713427006"]), multihot(IRBBB)])
    # sample 1 exact (1.0); sample 2: union {CRBBB, IRBBB} -> 0.4 / 2; only-NSR: 0.35 / 2 each
    observed, correct, baseline = 1.0 + 0.4 / 2, 2.0, 2 * 0.35 / 2
    expected = (observed - baseline) / (correct - baseline)
    assert metrics.challenge_score(y, o) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.85 / 1.65)


def test_multilabel_case_by_hand():
    y = np.stack([multihot(AF, PVC), multihot(NSR), multihot(STACH)])
    o = np.stack([multihot(AF, PAC), multihot(), multihot(STACH, NSR)])
    # sample 1: union {AF, PAC, PVC} -> 1/3 on (AF,AF) (AF,PAC) (PVC,AF) (PVC,PAC);
    # sample 2: nothing predicted -> 0;
    # sample 3: union {STach, NSR} -> 1/2 on (STach,STach) (STach,NSR)
    observed = (1.0 + 0.3375 + 0.375 + 0.4625) / 3 + (1.0 + 0.375) / 2
    correct = (1.0 + 0.375 + 0.375 + 1.0) / 2 + 1.0 + 1.0
    baseline = (0.25 + 0.375) / 3 + 1.0 + 0.375 / 2
    expected = (observed - baseline) / (correct - baseline)
    assert expected == pytest.approx(48 / 5700)
    assert metrics.challenge_score(y, o) == pytest.approx(expected, abs=1e-12)
    A = metrics.scored_confusion(y, o)
    assert A[AF, PAC] == pytest.approx(1 / 3) and A[STACH, NSR] == pytest.approx(0.5)
    assert A.sum() == pytest.approx(4 / 3 + 1.0)


def test_challenge_score_matches_reference_on_random_inputs():
    rng = np.random.default_rng(7)
    y = rng.random((120, 26)) < 0.15
    o = rng.random((120, 26)) < 0.2
    assert metrics.challenge_score(y, o) == pytest.approx(
        reference_challenge_score(y, o), abs=1e-12
    )


def test_challenge_score_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.challenge_score(np.zeros((3, 26), bool), np.zeros((4, 26), bool))


# --------------------------------------------------------------- ranking / thresholded metrics


@pytest.fixture(scope="module")
def random_scores():
    rng = np.random.default_rng(3)
    y = rng.random((300, 26)) < rng.uniform(0.05, 0.4, size=26)
    y[:, 4] = False  # single-valued class
    y[:, 9] = True  # single-valued class
    s = np.round(rng.random(y.shape) * 0.6 + 0.35 * y, 2)  # rounding creates ties
    return y, s


def test_micro_auroc_auprc_equal_sklearn(random_scores):
    y, s = random_scores
    assert metrics.auroc(y, s, "micro") == pytest.approx(
        roc_auc_score(y.ravel(), s.ravel()), abs=1e-12
    )
    assert metrics.auprc(y, s, "micro") == pytest.approx(
        average_precision_score(y.ravel(), s.ravel()), abs=1e-12
    )


def test_macro_auroc_auprc_equal_sklearn_over_defined_classes(random_scores):
    y, s = random_scores
    valid = [k for k in range(26) if 0 < y[:, k].sum() < len(y)]
    assert len(valid) == 24
    assert metrics.auroc(y, s, "macro") == pytest.approx(
        roc_auc_score(y[:, valid], s[:, valid], average="macro"), abs=1e-12
    )
    assert metrics.auprc(y, s, "macro") == pytest.approx(
        average_precision_score(y[:, valid], s[:, valid], average="macro"), abs=1e-12
    )
    per = metrics.per_class_auroc(y, s)
    assert np.isnan(per[4]) and np.isnan(per[9])
    assert per[0] == pytest.approx(roc_auc_score(y[:, 0], s[:, 0]), abs=1e-12)


def test_roc_curve_equals_sklearn(random_scores):
    y, s = random_scores
    fpr, tpr = metrics.roc_curve(y[:, 0], s[:, 0])
    ref_fpr, ref_tpr, _ = sk_roc_curve(y[:, 0], s[:, 0], drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.per_class_auroc(y, s)[0], abs=1e-12)
    assert metrics.roc_curve(y[:, 4], s[:, 4])[0].size == 0


def test_f1_and_exact_match_equal_sklearn(random_scores):
    y, s = random_scores
    o = s >= 0.5
    assert metrics.f1(y, o, "micro") == pytest.approx(f1_score(y, o, average="micro"), abs=1e-12)
    per_sk = f1_score(y, o, average=None, zero_division=np.nan)
    np.testing.assert_allclose(metrics.per_class_f1(y, o), per_sk, atol=1e-12)
    assert metrics.f1(y, o, "macro") == pytest.approx(np.nanmean(per_sk), abs=1e-12)
    o2 = y.copy()
    o2[:10, 0] = ~o2[:10, 0]
    assert metrics.exact_match_accuracy(y, o2) == pytest.approx(290 / 300)


def test_report_keys_and_none_for_undefined(random_scores):
    y, s = random_scores
    report = metrics.classification_report(y, s)
    assert list(report) == list(metrics.REPORT_KEYS)
    assert report["per_class"][4]["auroc"] is None and report["per_class"][9]["support"] == 300
    assert report["per_class"][CRBBB]["abbreviation"] == "CRBBB|RBBB"
    assert report["challenge_score"] == pytest.approx(metrics.challenge_score(y, s >= 0.5))
    json.dumps(report, allow_nan=False)


def test_aggregate_records_means_per_record():
    p = np.array([[0.2, 0.9], [0.4, 0.1], [0.6, 0.5], [1.0, 0.0]])
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], bool)
    records, means, labels = metrics.aggregate_records(p, [7, 7, 3, 7], y)
    assert records.tolist() == [3, 7]
    np.testing.assert_allclose(means, [[0.6, 0.5], [1.6 / 3, 1.0 / 3]])
    assert labels.tolist() == [[False, True], [True, True]]


# --------------------------------------------------------------- `ecgplat score`


def _run_cli(*args):
    from ecgplat.cli import app

    return CliRunner().invoke(app, list(args))


def test_score_cli_agrees_with_reference_on_fixture():
    assert FIXTURE.is_file(), "regenerate with: python tests/test_metrics.py"
    with np.load(FIXTURE) as data:
        y, p, keys = data["labels"], data["probabilities"], data["record_keys"]
    assert y.shape == (60, 26) and p.dtype == np.float32
    seg = _run_cli("score", str(FIXTURE), "--json", "--level", "segment")
    assert seg.exit_code == 0, seg.output
    seg_report = json.loads(seg.output)
    assert list(seg_report) == list(metrics.REPORT_KEYS)
    assert seg_report["challenge_score"] == pytest.approx(
        reference_challenge_score(y, p >= 0.5), abs=1e-9
    )
    valid = [k for k in range(26) if 0 < y[:, k].sum() < len(y)]
    assert seg_report["auroc_macro"] == pytest.approx(
        roc_auc_score(y[:, valid], p[:, valid], average="macro"), abs=1e-9
    )
    assert seg_report["auroc_micro"] == pytest.approx(roc_auc_score(y.ravel(), p.ravel()), abs=1e-9)

    rec = _run_cli("score", str(FIXTURE), "--json")  # record level is the default
    assert rec.exit_code == 0, rec.output
    rec_report = json.loads(rec.output)
    rec_p = p.reshape(30, 2, 26).astype(np.float64).mean(axis=1)  # rows are record-major pairs
    assert (keys[0::2] == keys[1::2]).all()
    assert rec_report["challenge_score"] == pytest.approx(
        reference_challenge_score(y[0::2], rec_p >= 0.5), abs=1e-9
    )
    assert rec_report["per_class"][0]["support"] == int(y[0::2, 0].sum())
    assert rec_report["challenge_score"] != pytest.approx(seg_report["challenge_score"])

    table = _run_cli("score", str(FIXTURE))
    assert (
        table.exit_code == 0 and "challenge_score" in table.output and "CRBBB|RBBB" in table.output
    )


def test_score_cli_rejects_bad_input(tmp_path):
    missing = _run_cli("score", str(tmp_path / "nope.npz"))
    assert missing.exit_code != 0 and "nope.npz" in missing.output
    bad = tmp_path / "bad.npz"
    np.savez(bad, labels=np.zeros((4, 26), bool), probabilities=np.zeros((5, 26)))
    res = _run_cli("score", str(bad), "--level", "segment")
    assert res.exit_code != 0 and "bad.npz" in res.output and "(N, 26)" in res.output
    no_keys = tmp_path / "nokeys.npz"
    np.savez(no_keys, labels=np.zeros((4, 26), bool), probabilities=np.zeros((4, 26)))
    res = _run_cli("score", str(no_keys))
    assert res.exit_code != 0 and "record_keys" in res.output
    res = _run_cli("score", str(FIXTURE), "--level", "patient")
    assert res.exit_code != 0


if __name__ == "__main__":
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    make_predictions_small(FIXTURE)
    print(f"wrote {FIXTURE}")
