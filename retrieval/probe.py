"""Linear probe: a scikit-learn linear model on a feature set's record embeddings, for any task.

`run_probe(store, features, labels)` takes the record-level embeddings of a feature set
(`ecgplat embed`) and the labels of a store task, standardises the embeddings with the train
split's mean and std, and fits on the train split:

* binary / multilabel: `LogisticRegression` (one per class; a class with one label value in
  train predicts its train prevalence); multiclass: one multinomial `LogisticRegression`;
* regression: `Ridge` on the standardised target (de-standardised predictions).

The regularisation (C = 1/alpha over `GRID`) is chosen on the valid split by the headline
metric (AUROC, macro AUROC, or MAE for regression; ties to the strongest regularisation), the
per-class thresholds are fitted on the valid split's probabilities (`threshold_rule`), and the
test split is scored once, with the same metrics, intervals and files as `ecgplat evaluate
task` (training.evaluate_task): `metrics.json` (level "record"), `predictions.csv`, plots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ecgplat.atomic import write_text

GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))  # C; Ridge alpha = 1 / C


class ProbeError(ValueError):
    """A probe that cannot run; one line naming the file and the reason."""


def _fit_predict(
    kind: str, x_tr, y_tr, x_ev: list, c: float, seed: int, n_out: int
) -> list[np.ndarray]:
    """Fit on (x_tr, y_tr) with strength `c`; probabilities / values for each of `x_ev`."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, Ridge

    if kind == "regression":
        mean, std = y_tr.mean(axis=0), y_tr.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        model = Ridge(alpha=1.0 / c).fit(x_tr, (y_tr - mean) / std)
        return [model.predict(x).reshape(len(x), -1) * std + mean for x in x_ev]

    def logistic():
        return LogisticRegression(C=c, max_iter=2000, random_state=seed)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if kind == "multiclass":
            model = logistic().fit(x_tr, y_tr)
            outs = []
            for x in x_ev:
                p = np.zeros((len(x), n_out))
                p[:, model.classes_] = model.predict_proba(x)
                outs.append(p)
            return outs
        outs = [np.zeros((len(x), y_tr.shape[1])) for x in x_ev]
        for k in range(y_tr.shape[1]):
            yk = y_tr[:, k] > 0.5
            if yk.all() or not yk.any():
                for o in outs:
                    o[:, k] = float(yk.mean())
                continue
            model = logistic().fit(x_tr, yk)
            for o, x in zip(outs, x_ev, strict=True):
                o[:, k] = model.predict_proba(x)[:, 1]
        return outs


def run_probe(
    store: str | Path,
    features: str,
    labels: str,
    out: str | Path | None = None,
    splits: tuple[str, str, str] = ("train", "valid", "test"),
    threshold_rule: str = "max_f1",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Fit, select and score the probe (module docstring); returns the summary also written to
    `out/metrics.json`. Raises ProbeError."""
    from ecgplat.store import open_store
    from ecgplat.store.task_store import read_task
    from retrieval.features import load_features
    from training.evaluate_task import plot_task, task_targets, write_predictions
    from training.task_metrics import (
        HEADLINE,
        fit_thresholds,
        report_with_intervals,
        task_metrics,
    )
    from training.tasks.heads import task_entry

    st = open_store(store)
    try:
        stored = read_task(st, labels)
    except KeyError as e:
        raise ProbeError(str(e.args[0])) from None
    feats = load_features(store, features, "record")
    spec, kind = stored.spec, stored.spec.kind
    dense = stored.dense(st.n_records)
    split = np.asarray(st.column("split")).astype(str)
    x_all = feats.embeddings.astype(np.float64)
    rec = feats.record_index
    labelled = ~np.isnan(dense[rec]).any(axis=1)
    parts = {}
    for name in splits:
        rows = np.flatnonzero(labelled & (split[rec] == name))
        if len(rows) < 2:
            raise ProbeError(
                f"{store}: split '{name}' has {len(rows)} record(s) with both a '{features}' "
                f"embedding and a '{labels}' label (need at least 2)"
            )
        parts[name] = rows
    tr, va, te = (parts[n] for n in splits)
    mean, std = x_all[tr].mean(axis=0), x_all[tr].std(axis=0)
    x = (x_all - mean) / np.where(std > 0, std, 1.0)
    y = task_targets(kind, dense[rec])
    y_fit = y if kind != "multiclass" else y.astype(np.int64)
    if kind == "multiclass" and len(np.unique(y_fit[tr])) < 2:
        raise ProbeError(f"{store}: task {labels}: the train split holds a single class")

    n_out = len(spec.classes)
    headline = HEADLINE[kind][0] if kind != "multiclass" else "auroc_macro"
    minimise = kind == "regression"
    scores = []
    for c in GRID:
        (p_va,) = _fit_predict(kind, x[tr], y_fit[tr], [x[va]], c, seed, n_out)
        value = task_metrics(kind, y[va], p_va, None, spec.classes, detail=False)[headline]
        scores.append(None if value is None or not math.isfinite(value) else float(value))
    valid = [(s if not minimise else -s, -i) for i, s in enumerate(scores) if s is not None]
    if not valid:
        raise ProbeError(f"{store}: the '{splits[1]}' split cannot score {headline} for {labels}")
    best = -max(valid)[1]
    c = GRID[best]
    p_va, p_te = _fit_predict(kind, x[tr], y_fit[tr], [x[va], x[te]], c, seed, n_out)
    thresholds = None
    if kind in ("binary", "multilabel"):
        thresholds = fit_thresholds(y[va] > 0.5, p_va, threshold_rule)
    task = task_entry(spec, thresholds, threshold_rule if thresholds else None)
    patient = np.asarray(st.column("patient_key")).astype(str)
    report = report_with_intervals(
        kind, y[te], p_te, patient[rec[te]], thresholds, spec.classes, n_boot, seed
    )
    out_dir = Path(out) if out is not None else Path(f"probe-{features}-{labels}")
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = np.asarray(st.column("record_key")).astype(str)
    write_predictions(out_dir / "predictions.csv", task, keys[rec[te]], dense[rec[te]], p_te)
    plot_task(out_dir, task, y[te], p_te, report, splits[2])
    summary = {
        "store": str(store),
        "features": features,
        "features_checkpoint_sha256": feats.lineage.get("checkpoint_sha256"),
        "labels": labels,
        "task": task,
        "split": splits[2],
        "probe": {
            "model": "ridge" if kind == "regression" else "logistic_regression",
            "standardised": True,
            "selected_on": splits[1],
            "metric": headline,
            "grid": [{"C": g, "valid": s} for g, s in zip(GRID, scores, strict=True)],
            "C": c,
            "n_train": int(len(tr)),
            "n_valid": int(len(va)),
        },
        "n_records": int(len(te)),
        "n_patients": int(len(np.unique(patient[rec[te]]))),
        "levels": {"record": report},
        "out": str(out_dir),
    }
    write_text(out_dir / "metrics.json", json.dumps(summary, indent=2, allow_nan=False))
    return summary
