"""Metrics of any task kind, their patient-level bootstrap intervals, and threshold fitting.

* classification (binary, multilabel, multiclass one-vs-rest): AUROC and AUPRC (macro, micro,
  per class; `training.cinc_metrics`' rank formulas), and at the chosen thresholds
  sensitivity, specificity and F1 per class and macro; multiclass adds accuracy and the
  confusion matrix (rows = true class, columns = predicted, the argmax). Calibration: the
  expected calibration error over `ECE_BINS` equal-width bins (binary/multilabel: every
  (record, class) probability against its label; multiclass: the top-label confidence against
  being right), and the reliability curve behind it.
* regression: MAE, RMSE, R² and Pearson r, per target column (the headline is the first
  column's).
* `bootstrap`: 95 % percentile intervals of the headline metrics, resampling patients (all the
  rows of a drawn patient enter together, as often as the patient is drawn), never rows.
* `fit_thresholds`: per class on validation outputs, "max_f1" (the threshold maximising F1) or
  "youden" (maximising sensitivity + specificity - 1); candidates are the midpoints between
  consecutive distinct scores (and the ends), ties go to the highest threshold. A class without
  both label values keeps 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from training.cinc_metrics import _binary_auroc, _binary_average_precision

ECE_BINS = 10
RULES = ("max_f1", "youden", "fixed")


def _none(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _nanmean(values) -> float:
    a = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else math.nan


# --- thresholds ------------------------------------------------------------------------------


def fit_threshold(y: np.ndarray, s: np.ndarray, rule: str) -> float:
    """The threshold of one class (predict positive when score >= threshold) under `rule`."""
    y = np.asarray(y, dtype=bool).reshape(-1)
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    n_pos = int(y.sum())
    if rule == "fixed" or n_pos == 0 or n_pos == y.size:
        return 0.5
    distinct = np.unique(s)  # ascending
    candidates = np.r_[distinct[0] - 1e-6, (distinct[:-1] + distinct[1:]) / 2, distinct[-1] + 1e-6]
    candidates = candidates[::-1]  # descending: ties keep the highest threshold
    pred = s[None, :] >= candidates[:, None]
    tp = (pred & y).sum(axis=1).astype(np.float64)
    fp = (pred & ~y).sum(axis=1).astype(np.float64)
    if rule == "max_f1":
        fn = n_pos - tp
        denom = 2 * tp + fp + fn
        score = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    elif rule == "youden":
        score = tp / n_pos - fp / (y.size - n_pos)
    else:
        raise ValueError(f"threshold rule {rule!r}: choose one of {', '.join(RULES)}")
    best = np.flatnonzero(score >= score.max() - 1e-12)[0]  # ties (up to rounding): highest
    return float(candidates[int(best)])


def fit_thresholds(y: np.ndarray, p: np.ndarray, rule: str) -> list[float]:
    """Per-class thresholds for (N, C) labels and probabilities."""
    y = np.asarray(y, dtype=bool).reshape(len(p), -1)
    return [fit_threshold(y[:, k], p[:, k], rule) for k in range(y.shape[1])]


# --- classification --------------------------------------------------------------------------


def expected_calibration_error(
    correct: np.ndarray, confidence: np.ndarray, bins: int = ECE_BINS
) -> tuple[float, dict]:
    """(ECE, reliability curve): sum over equal-width confidence bins of |accuracy - mean
    confidence| weighted by the bin's share; the curve lists each bin's count, mean confidence
    and observed frequency (None for an empty bin)."""
    c = np.asarray(confidence, dtype=np.float64).reshape(-1)
    a = np.asarray(correct, dtype=np.float64).reshape(-1)
    which = np.clip((c * bins).astype(int), 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    conf = np.bincount(which, weights=c, minlength=bins)
    acc = np.bincount(which, weights=a, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf, freq = conf / count, acc / count
    filled = count > 0
    ece = float(np.sum(count[filled] / max(len(c), 1) * np.abs(freq[filled] - mean_conf[filled])))
    curve = {
        "count": count.astype(int).tolist(),
        "confidence": [_none(v) for v in mean_conf],
        "frequency": [_none(v) for v in freq],
    }
    return ece, curve


def _rates(y: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    tp = (y & pred).sum(axis=0).astype(np.float64)
    fp = (~y & pred).sum(axis=0).astype(np.float64)
    fn = (y & ~pred).sum(axis=0).astype(np.float64)
    tn = (~y & ~pred).sum(axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan),
        }


def classification_metrics(
    kind: str,
    y: np.ndarray,
    p: np.ndarray,
    thresholds: list[float] | None = None,
    classes: tuple[str, ...] | list[str] | None = None,
    detail: bool = True,
) -> dict:
    """Metrics of one classification kind. `y`: binary/multilabel (N, C) 0/1, multiclass (N,)
    class index; `p`: (N, C) probabilities; `thresholds` per class (binary/multilabel; None =
    0.5). `detail=False` leaves out the per-class lists, the curve and the confusion matrix."""
    p = np.asarray(p, dtype=np.float64)
    n_classes = p.shape[1]
    if kind == "multiclass":
        idx = np.asarray(y, dtype=np.int64).reshape(-1)
        yb = np.zeros_like(p, dtype=bool)
        yb[np.arange(len(idx)), idx] = True
        pred_idx = p.argmax(axis=1)
        pred = np.zeros_like(yb)
        pred[np.arange(len(idx)), pred_idx] = True
    else:
        yb = np.asarray(y, dtype=bool).reshape(p.shape)
        t = np.full(n_classes, 0.5) if thresholds is None else np.asarray(thresholds, float)
        pred = p >= t[None, :]
    per_auroc = np.array([_binary_auroc(yb[:, k], p[:, k]) for k in range(n_classes)])
    per_auprc = np.array([_binary_average_precision(yb[:, k], p[:, k]) for k in range(n_classes)])
    rates = _rates(yb, pred)
    out: dict = {
        "n": int(len(p)),
        "auroc_macro": _nanmean(per_auroc),
        "auroc_micro": _binary_auroc(yb.ravel(), p.ravel()),
        "auprc_macro": _nanmean(per_auprc),
        "auprc_micro": _binary_average_precision(yb.ravel(), p.ravel()),
        "sensitivity_macro": _nanmean(rates["sensitivity"]),
        "specificity_macro": _nanmean(rates["specificity"]),
        "f1_macro": _nanmean(rates["f1"]),
    }
    if kind == "multiclass":
        out["accuracy"] = float((pred_idx == idx).mean()) if len(idx) else math.nan
        ece, curve = expected_calibration_error(pred_idx == idx, p.max(axis=1))
    else:
        ece, curve = expected_calibration_error(yb.ravel(), p.ravel())
    out["ece"] = ece
    if kind == "binary":  # one class: its own numbers, no averages
        for name in ("auroc", "auprc", "sensitivity", "specificity", "f1"):
            out[name] = out.pop(f"{name}_macro")
            out.pop(f"{name}_micro", None)
    out = {k: (_none(v) if isinstance(v, float) else v) for k, v in out.items()}
    if not detail:
        return out
    names = list(classes) if classes is not None else [str(k) for k in range(n_classes)]
    out["per_class"] = [
        {
            "class": names[k],
            "support": int(yb[:, k].sum()),
            "auroc": _none(per_auroc[k]),
            "auprc": _none(per_auprc[k]),
            "sensitivity": _none(rates["sensitivity"][k]),
            "specificity": _none(rates["specificity"][k]),
            "f1": _none(rates["f1"][k]),
            **({} if kind == "multiclass" else {"threshold": float(t[k])}),
        }
        for k in range(n_classes)
    ]
    out["reliability"] = curve
    if kind == "multiclass":
        cm = np.zeros((n_classes, n_classes), dtype=np.int64)
        np.add.at(cm, (idx, pred_idx), 1)
        out["confusion_matrix"] = cm.tolist()
    return out


# --- regression ------------------------------------------------------------------------------


def regression_metrics(
    y: np.ndarray, v: np.ndarray, columns: tuple[str, ...] | list[str] | None = None
) -> dict:
    """MAE, RMSE, R² (1 - SSE/SST) and Pearson r of predictions `v` against targets `y`, both
    (N, C); the headline numbers are the first column's, `per_target` has every column's."""
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    v = np.asarray(v, dtype=np.float64).reshape(y.shape)
    per = []
    for k in range(y.shape[1]):
        err = v[:, k] - y[:, k]
        sst = float(np.sum((y[:, k] - y[:, k].mean()) ** 2)) if len(y) else 0.0
        sd_y, sd_v = (float(np.std(y[:, k])), float(np.std(v[:, k]))) if len(y) else (0.0, 0.0)
        r = (
            float(np.mean((y[:, k] - y[:, k].mean()) * (v[:, k] - v[:, k].mean())) / (sd_y * sd_v))
            if sd_y > 0 and sd_v > 0
            else math.nan
        )
        per.append(
            {
                "target": (list(columns) if columns else [str(i) for i in range(y.shape[1])])[k],
                "mae": float(np.mean(np.abs(err))) if len(y) else math.nan,
                "rmse": float(np.sqrt(np.mean(err**2))) if len(y) else math.nan,
                "r2": 1.0 - float(np.sum(err**2)) / sst if sst > 0 else math.nan,
                "pearson_r": r,
            }
        )
    per = [{k: (_none(x) if isinstance(x, float) else x) for k, x in row.items()} for row in per]
    head = {k: per[0][k] for k in ("mae", "rmse", "r2", "pearson_r")}
    return {"n": int(len(y)), **head, "per_target": per}


HEADLINE = {
    "binary": ("auroc", "auprc", "sensitivity", "specificity", "f1", "ece"),
    "multilabel": (
        "auroc_macro",
        "auroc_micro",
        "auprc_macro",
        "auprc_micro",
        "sensitivity_macro",
        "specificity_macro",
        "f1_macro",
        "ece",
    ),
    "multiclass": ("accuracy", "auroc_macro", "auprc_macro", "f1_macro", "ece"),
    "regression": ("mae", "rmse", "r2", "pearson_r"),
}


def task_metrics(kind: str, y, outputs, thresholds=None, classes=None, detail=True) -> dict:
    """`classification_metrics` or `regression_metrics` for `kind`."""
    if kind == "regression":
        return regression_metrics(y, outputs, classes)
    return classification_metrics(kind, y, outputs, thresholds, classes, detail)


# --- bootstrap -------------------------------------------------------------------------------


def patient_bootstrap(
    metric: Callable[[np.ndarray], dict],
    patients: np.ndarray,
    names: tuple[str, ...],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, list[float] | None]:
    """95 % percentile intervals {name: [low, high]} of `metric(rows)[name]`, resampling the
    distinct `patients` (one per row) with replacement `n_boot` times; replicates where a metric
    is undefined are left out of its interval (None if fewer than half remain)."""
    patients = np.asarray(patients)
    _, inverse = np.unique(patients, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(n_boot):
        pick = rng.integers(0, len(counts), len(counts))
        lengths = counts[pick]
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        rows = order[np.repeat(starts[pick], lengths) + offsets]
        values = metric(rows)
        for n in names:
            v = values.get(n)
            if v is not None and math.isfinite(v):
                draws[n].append(float(v))
    out: dict[str, list[float] | None] = {}
    for n in names:
        d = np.asarray(draws[n])
        out[n] = (
            [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]
            if len(d) >= max(1, n_boot // 2)
            else None
        )
    return out


def report_with_intervals(
    kind: str,
    y: np.ndarray,
    outputs: np.ndarray,
    patients: np.ndarray,
    thresholds=None,
    classes=None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """The full metrics of one level plus `ci95` for its headline metrics (patient bootstrap)."""
    report = task_metrics(kind, y, outputs, thresholds, classes)
    names = HEADLINE[kind]
    if n_boot > 0 and len(outputs):
        report["ci95"] = patient_bootstrap(
            lambda rows: task_metrics(kind, y[rows], outputs[rows], thresholds, classes, False),
            patients,
            names,
            n_boot,
            seed,
        )
        report["bootstrap"] = {"replicates": n_boot, "unit": "patient", "seed": seed}
    return report
