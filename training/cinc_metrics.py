"""Multi-label classification metrics for the 26 scored CinC 2021 classes (numpy in, floats out).

* ``challenge_score``: the PhysioNet/CinC 2021 challenge metric. Each sample spreads one unit of
  mass over (true class, predicted class) pairs, normalised by the size of the union of its true and
  predicted label sets; the weighted sum of that confusion matrix is rescaled so that the labels
  themselves score 1 and "always normal sinus rhythm" scores 0.
* ``auroc`` / ``auprc``: ``average="micro"`` flattens the (N, 26) arrays into one binary problem
  (what fairseq-signals logs); ``average="macro"`` is the unweighted mean over the classes whose
  labels contain both values. A class whose labels are all 0 (or all 1) has no defined ROC/PR
  curve: its per-class value is NaN and it is left out of the macro mean (NaN if no class is left).
* ``f1``: thresholded predictions; micro from summed TP/FP/FN, macro the mean of per-class F1 over
  the classes where F1 is defined (some true or predicted positive). ``exact_match_accuracy``
  compares whole label vectors.
* ``aggregate_records``: segment probabilities averaged per record, for record-level metrics.

Ranks and curves are computed here with numpy/scipy only (scikit-learn is a test dependency that
the tests use as the independent reference).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

REPORT_KEYS = (
    "challenge_score",
    "auroc_macro",
    "auroc_micro",
    "auprc_macro",
    "auprc_micro",
    "f1_macro",
    "f1_micro",
    "accuracy",
    "per_class",
)


def _as_2d(name: str, a, dtype) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (n_samples, n_classes), got shape {arr.shape}")
    return arr.astype(dtype, copy=False)


def _check_pair(labels, other, other_name: str, other_dtype) -> tuple[np.ndarray, np.ndarray]:
    y = _as_2d("labels", labels, bool)
    o = _as_2d(other_name, other, other_dtype)
    if y.shape != o.shape:
        raise ValueError(f"labels {y.shape} and {other_name} {o.shape} differ in shape")
    return y, o


# --------------------------------------------------------------------------- challenge score


def scored_confusion(labels, outputs) -> np.ndarray:
    """The challenge's normalised multi-label confusion matrix A (C, C): for every sample,
    A[i, j] += 1 / max(1, |true ∪ predicted|) for each true class i and predicted class j."""
    y, o = _check_pair(labels, outputs, "outputs", bool)
    norm = np.maximum(1, (y | o).sum(axis=1)).astype(np.float64)
    return (y / norm[:, None]).T @ o.astype(np.float64)


def challenge_score(labels, predictions, weights=None, normal_index: int | None = None) -> float:
    """CinC 2021 challenge score of binary ``predictions`` (N, 26) against ``labels`` (N, 26).

    ``weights`` defaults to ``ecgplat.labels.WEIGHTS`` and ``normal_index`` to its NSR column.
    Score(y, o) = sum(W * A(y, o)); result = (O - I) / (C - I) with O = Score(y, predictions),
    C = Score(y, y), I = Score(y, only-NSR); 0.0 when C == I."""
    if weights is None or normal_index is None:
        from ecgplat import labels as label_table

        weights = label_table.WEIGHTS if weights is None else weights
        normal_index = label_table.NORMAL_INDEX if normal_index is None else normal_index
    w = np.asarray(weights, dtype=np.float64)
    y, o = _check_pair(labels, predictions, "predictions", bool)
    if w.shape != (y.shape[1], y.shape[1]):
        raise ValueError(f"weights {w.shape} do not match {y.shape[1]} classes")
    inactive = np.zeros_like(y)
    inactive[:, normal_index] = True
    observed = float(np.sum(w * scored_confusion(y, o)))
    correct = float(np.sum(w * scored_confusion(y, y)))
    baseline = float(np.sum(w * scored_confusion(y, inactive)))
    if correct == baseline:
        return 0.0
    return (observed - baseline) / (correct - baseline)


# --------------------------------------------------------------------------- ranking metrics


def _binary_auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count one half); NaN unless both label values occur."""
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)  # average ranks handle ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _threshold_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positive counts when thresholding at each distinct score, descending."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s_sorted)), y.size - 1]
    tps = np.cumsum(y_sorted)[last_of_tie].astype(np.float64)
    return tps, last_of_tie + 1 - tps


def _binary_average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Step-wise area under the precision-recall curve, sum_k (R_k - R_{k-1}) P_k over the
    distinct score thresholds (descending); NaN unless both label values occur."""
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return math.nan
    tps, fps = _threshold_counts(y, s)
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _per_class(fn, labels, scores) -> np.ndarray:
    y, s = _check_pair(labels, scores, "scores", np.float64)
    return np.array([fn(y[:, k], s[:, k]) for k in range(y.shape[1])], dtype=np.float64)


def _averaged(fn, labels, scores, average: str) -> float:
    if average == "micro":
        y, s = _check_pair(labels, scores, "scores", np.float64)
        return fn(y.ravel(), s.ravel())
    if average == "macro":
        per = _per_class(fn, labels, scores)
        return float(np.nanmean(per)) if np.isfinite(per).any() else math.nan
    raise ValueError(f"average must be 'micro' or 'macro', got {average!r}")


def _curve_counts(labels, scores) -> tuple[np.ndarray, np.ndarray, int, int] | None:
    """(true positives, false positives) at every distinct threshold of one class, its
    positives and its size; None when the labels are single-valued."""
    y = np.asarray(labels, dtype=bool).reshape(-1)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return None
    tps, fps = _threshold_counts(y, np.asarray(scores, dtype=np.float64).reshape(-1))
    return tps, fps, n_pos, y.size


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) of one class at every distinct threshold,
    from (0, 0) to (1, 1); both empty arrays when the labels are single-valued."""
    counts = _curve_counts(labels, scores)
    if counts is None:
        return np.zeros(0), np.zeros(0)
    tps, fps, n_pos, n = counts
    return np.r_[0.0, fps / (n - n_pos)], np.r_[0.0, tps / n_pos]


def pr_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) of one class at every distinct threshold, descending (the points
    whose step-wise area is the average precision); empty when the labels are single-valued."""
    counts = _curve_counts(labels, scores)
    if counts is None:
        return np.zeros(0), np.zeros(0)
    tps, fps, n_pos, _ = counts
    return tps / n_pos, tps / (tps + fps)


def per_class_auroc(labels, scores) -> np.ndarray:
    """AUROC of each class (NaN for a class whose labels are all one value)."""
    return _per_class(_binary_auroc, labels, scores)


def auroc(labels, scores, average: str = "macro") -> float:
    """Area under the ROC curve, ``average`` "micro" (flattened) or "macro" (see module doc)."""
    return _averaged(_binary_auroc, labels, scores, average)


def auprc(labels, scores, average: str = "macro") -> float:
    """Average precision (area under the PR curve), "micro" or "macro" (see module doc)."""
    return _averaged(_binary_average_precision, labels, scores, average)


# --------------------------------------------------------------------------- thresholded metrics


def _counts(labels, predictions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, o = _check_pair(labels, predictions, "predictions", bool)
    tp = (y & o).sum(axis=0)
    fp = (~y & o).sum(axis=0)
    fn = (y & ~o).sum(axis=0)
    return tp, fp, fn


def per_class_f1(labels, predictions) -> np.ndarray:
    """F1 of each class; NaN where it is undefined (no true and no predicted positive)."""
    tp, fp, fn = _counts(labels, predictions)
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan).astype(np.float64)


def f1(labels, predictions, average: str = "macro") -> float:
    """F1 of binary predictions: "micro" (summed counts) or "macro" (mean of defined classes)."""
    if average == "micro":
        tp, fp, fn = (c.sum() for c in _counts(labels, predictions))
        denom = 2 * tp + fp + fn
        return float(2 * tp / denom) if denom else math.nan
    if average == "macro":
        per = per_class_f1(labels, predictions)
        return float(np.nanmean(per)) if np.isfinite(per).any() else math.nan
    raise ValueError(f"average must be 'micro' or 'macro', got {average!r}")


def exact_match_accuracy(labels, predictions) -> float:
    """Fraction of samples whose whole predicted label vector equals the true one."""
    y, o = _check_pair(labels, predictions, "predictions", bool)
    return float(np.mean(np.all(y == o, axis=1))) if len(y) else math.nan


# --------------------------------------------------------------------------- report + aggregation


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def classification_report(labels, probabilities, threshold: float = 0.5) -> dict:
    """Every metric of the diagnosis task for (N, 26) labels and probabilities.

    Keys: challenge_score, auroc_macro, auroc_micro, auprc_macro, auprc_micro, f1_macro, f1_micro,
    accuracy (exact match) and per_class (list of {class, abbreviation, auroc, f1, support}).
    Undefined values (see module doc) are None so that the dict serialises as strict JSON."""
    from ecgplat import labels as label_table

    y, p = _check_pair(labels, probabilities, "probabilities", np.float64)
    if y.shape[1] != len(label_table.CLASS_NAMES):
        raise ValueError(f"expected {len(label_table.CLASS_NAMES)} classes, got {y.shape[1]}")
    pred = p >= threshold
    class_auroc = per_class_auroc(y, p)
    class_f1 = per_class_f1(y, pred)
    support = y.sum(axis=0)
    report = {
        "challenge_score": challenge_score(y, pred),
        "auroc_macro": auroc(y, p, "macro"),
        "auroc_micro": auroc(y, p, "micro"),
        "auprc_macro": auprc(y, p, "macro"),
        "auprc_micro": auprc(y, p, "micro"),
        "f1_macro": f1(y, pred, "macro"),
        "f1_micro": f1(y, pred, "micro"),
        "accuracy": exact_match_accuracy(y, pred),
    }
    report = {k: _nan_to_none(v) for k, v in report.items()}
    report["per_class"] = [
        {
            "class": label_table.CLASS_NAMES[k],
            "abbreviation": label_table.ABBREVIATIONS[k],
            "auroc": _nan_to_none(class_auroc[k]),
            "f1": _nan_to_none(class_f1[k]),
            "support": int(support[k]),
        }
        for k in range(y.shape[1])
    ]
    return report


def aggregate_records(probabilities, record_index, labels=None):
    """Average segment probabilities per record.

    Returns ``(records, record_probabilities, record_labels)``: the sorted unique record
    indices, the (R, C) mean probabilities and, when ``labels`` is given, the (R, C) record
    labels (a record's segments share its labels; OR-ed to be safe), else None."""
    p = np.asarray(probabilities, dtype=np.float64)
    rec = np.asarray(record_index).reshape(-1)
    if p.ndim != 2 or len(p) != len(rec):
        raise ValueError(f"probabilities {p.shape} and record_index {rec.shape} do not align")
    records, inverse = np.unique(rec, return_inverse=True)
    sums = np.zeros((len(records), p.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, p)
    means = sums / np.bincount(inverse, minlength=len(records))[:, None]
    record_labels = None
    if labels is not None:
        y = _as_2d("labels", labels, bool)
        if y.shape != p.shape:
            raise ValueError(f"labels {y.shape} and probabilities {p.shape} differ in shape")
        record_labels = np.zeros((len(records), y.shape[1]), dtype=bool)
        np.logical_or.at(record_labels, inverse, y)
    return records, means, record_labels
