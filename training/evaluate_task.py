"""Evaluation of a fine-tuned checkpoint on its task (any kind): metrics with patient-level
bootstrap intervals at record and segment level, thresholds from the checkpoint, files and plots.

`evaluate_task(checkpoint, store, split, out)` runs the model over the labelled records of a
store split (the checkpoint's task, or `labels=` another task of the store with the same
classes and kind) and writes to `out`:

* `metrics.json`: `{"task": the checkpoint's task entry, "checkpoint_sha256", "split",
  "n_records", "n_segments", "n_patients", "leads", "precision", "levels": {"record": report,
  "segment": report}}`; a report is `training.task_metrics.report_with_intervals`' (headline
  metrics, per class / per target, reliability curve, confusion matrix, `ci95`);
* `predictions.csv`: one row per record: `record_key`, the target(s), the probability per class
  (`p_<class>`) and the label at the thresholds (`label_<class>`; multiclass `label`), or the
  predicted value (`value_<target>`), as `ecgplat predict` names them;
* plots: classification `roc.png` and `reliability.png` (+ `confusion.png` for multiclass),
  regression `scatter.png` (record level).

Thresholds are the checkpoint's (fitted on the validation split at training time); the split
evaluated here never chooses them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ecgplat.atomic import atomic_path, write_text
from ecgplat.file_hash import file_sha256


class TaskEvaluationError(ValueError):
    """An evaluation that cannot run; one line naming the file and the reason."""


def task_targets(kind: str, target: np.ndarray) -> np.ndarray:
    """A task file's targets in the metrics' form (multiclass: (N,) class index)."""
    return target[:, 0].astype(np.int64) if kind == "multiclass" else target


def level_scores(task: dict, logits: np.ndarray) -> np.ndarray:
    """Probabilities (classification) or values in the target's units (regression)."""
    from training.tasks.heads import outputs_to_predictions

    pred = outputs_to_predictions(torch.from_numpy(logits), task)
    return pred["values"] if task["kind"] == "regression" else pred["probabilities"]


def evaluate_task(
    checkpoint: str | Path,
    store: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    leads: str | None = None,
    labels: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = False,
    wandb_mode: str = "disabled",
) -> dict:
    """Evaluate a fine-tuned checkpoint (see the module docstring); returns the summary also
    written to `out/metrics.json`. Raises TaskEvaluationError. With W&B on (`wandb_mode`),
    the record level's dashboard (`training.dashboard`), the plots and the checkpoint artifact
    with its store's lineage go to a W&B run in `out/wandb`."""
    from ecgplat.leads import LEADS, parse_leads
    from ecgplat.progress import ProgressBar
    from ecgplat.store import open_store
    from ecgplat.store.task_store import read_task
    from training.batch import store_batches
    from training.distributed import pick_device
    from training.models.checkpoint_file import CheckpointError
    from training.models.classifier import load_diagnosis_model
    from training.normalize import mode_of, normalize_store_batches
    from training.precision import resolve_precision
    from training.task_metrics import report_with_intervals
    from training.task_outputs import raw_outputs, record_level
    from training.tasks.heads import task_of_checkpoint

    checkpoint = Path(checkpoint)
    try:
        model, ckpt = load_diagnosis_model(checkpoint)
        task = task_of_checkpoint(ckpt)
    except (CheckpointError, ValueError) as e:
        message = str(e) if str(checkpoint) in str(e) else f"{checkpoint}: {e}"
        raise TaskEvaluationError(message) from None
    try:
        st = open_store(store)
    except (FileNotFoundError, ValueError) as e:
        raise TaskEvaluationError(str(e)) from None
    name = labels or task["name"]
    try:
        stored = read_task(st, name)
    except KeyError as e:
        raise TaskEvaluationError(str(e.args[0])) from None
    if stored.spec.kind != task["kind"] or list(stored.spec.classes) != list(task["classes"]):
        raise TaskEvaluationError(
            f"{store}: task {name!r} ({stored.spec.kind}, {len(stored.spec.classes)} classes) "
            f"is not the checkpoint's ({task['kind']}, {len(task['classes'])} classes)"
        )
    dense = stored.dense(st.n_records)
    records = st.select(split=split)
    records = records[~np.isnan(dense[records]).any(axis=1)]
    if records.size == 0:
        raise TaskEvaluationError(f"{store}: split '{split}' has no record labelled for {name!r}")
    trained = str(ckpt.get("extra", {}).get("leads") or "12")
    lead_spec = leads or trained
    try:
        lead_idx = parse_leads(lead_spec)
    except ValueError as e:
        raise TaskEvaluationError(f"--leads {lead_spec}: {e}") from None
    try:
        dev = pick_device(device)
    except (RuntimeError, ValueError) as e:
        raise TaskEvaluationError(f"--device {device}: {e}") from None
    model.to(dev)

    with ProgressBar(progress, len(records), f"evaluate {split}", transient=True) as bar:
        outputs = raw_outputs(
            model,
            normalize_store_batches(
                st,
                store_batches(st, records, lead_idx, batch_size, on_record=bar.advance),
                mode_of(ckpt),
                lead_idx,
            ),
            precision,
        )
    kind = task["kind"]
    thresholds = task.get("thresholds")
    patient = np.asarray(st.column("patient_key")).astype(str)
    seg_scores = level_scores(task, outputs.logits)
    rec, rec_scores = record_level(seg_scores, outputs.record_index)
    levels = {}
    for level, rows, scores in (
        ("record", rec, rec_scores),
        ("segment", outputs.record_index, seg_scores),
    ):
        levels[level] = report_with_intervals(
            kind,
            task_targets(kind, dense[rows]),
            scores,
            patient[rows],
            thresholds,
            tuple(task["classes"]),
            n_boot,
            seed,
        )

    out_dir = Path(out) if out is not None else checkpoint.parent / f"eval-{name}-{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = np.asarray(st.column("record_key")).astype(str)
    write_predictions(out_dir / "predictions.csv", task, keys[rec], dense[rec], rec_scores)
    plot_task(out_dir, task, task_targets(kind, dense[rec]), rec_scores, levels["record"], split)
    summary = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_sha256(checkpoint),
        "store": str(store),
        "split": split,
        "labels": name,
        "task": task,
        "n_records": int(len(rec)),
        "n_segments": int(len(outputs.record_index)),
        "n_patients": int(len(np.unique(patient[rec]))),
        "leads": [LEADS[i] for i in lead_idx],
        "trained_leads": trained,
        "precision": resolve_precision(precision, dev),
        "levels": levels,
        "out": str(out_dir),
    }
    write_text(out_dir / "metrics.json", json.dumps(summary, indent=2, allow_nan=False))
    if wandb_mode != "disabled":
        from training.dashboard import log_evaluation, store_lineage

        log_evaluation(
            out_dir,
            mode=wandb_mode,
            name=f"eval-{name}-{split}",
            config={"checkpoint": str(checkpoint), "split": split, "labels": name},
            metrics={
                f"{level}/{k}": v
                for level, report in levels.items()
                for k, v in report.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            },
            levels=[("record/", task, task_targets(kind, dense[rec]), rec_scores)],
            images={
                n: out_dir / f"{n}.png" for n in ("roc", "reliability", "confusion", "scatter")
            },
            checkpoint=checkpoint,
            lineage={"store": store_lineage(st), "init": (ckpt.get("extra") or {}).get("init")},
        )
    return summary


def write_predictions(path: Path, task: dict, keys, targets: np.ndarray, scores: np.ndarray):
    """The record-level predictions table (module docstring)."""
    import pandas as pd

    kind, classes = task["kind"], list(task["classes"])
    cols: dict[str, object] = {"record_key": keys}
    if kind == "regression":
        for k, c in enumerate(classes):
            cols[f"target_{c}"] = targets[:, k]
            cols[f"value_{c}"] = scores[:, k]
    else:
        if kind == "multiclass":
            cols["target"] = [classes[int(i)] for i in targets[:, 0]]
        else:
            for k, c in enumerate(classes):
                cols[f"target_{c}"] = targets[:, k].astype(int)
        for k, c in enumerate(classes):
            cols[f"p_{c}"] = scores[:, k]
        if kind == "multiclass":
            cols["label"] = [classes[int(i)] for i in scores.argmax(axis=1)]
        else:
            t = np.asarray(task.get("thresholds") or [0.5] * len(classes))
            for k, c in enumerate(classes):
                cols[f"label_{c}"] = (scores[:, k] >= t[k]).astype(int)
    with atomic_path(path) as tmp:
        pd.DataFrame(cols).to_csv(tmp, index=False, float_format="%.6g")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def plot_task(out_dir: Path, task: dict, y: np.ndarray, scores: np.ndarray, report: dict, split):
    """Record-level plots: ROC + reliability (+ confusion), or the regression scatter."""
    from training.cinc_metrics import roc_curve

    kind, classes = task["kind"], list(task["classes"])
    if kind == "regression":
        fig = _figure(6, 6)
        ax = fig.add_subplot(1, 1, 1)
        ax.scatter(y[:, 0], scores[:, 0], s=8, alpha=0.6)
        lo = float(min(y[:, 0].min(), scores[:, 0].min()))
        hi = float(max(y[:, 0].max(), scores[:, 0].max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set(
            xlabel=f"true {classes[0]}",
            ylabel=f"predicted {classes[0]}",
            title=f"{task['name']}, {split}: MAE {report['mae']:.3g}, "
            f"r {report['pearson_r'] or 0:.3f}",
        )
        _save(fig, out_dir / "scatter.png")
        return
    if kind == "multiclass":
        yb = np.zeros_like(scores, dtype=bool)
        yb[np.arange(len(y)), y] = True
    else:
        yb = np.asarray(y, dtype=bool)
    fig = _figure(7, 6)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for k, c in enumerate(classes[:30]):
        fpr, tpr = roc_curve(yb[:, k], scores[:, k])
        if fpr.size:
            ax.plot(fpr, tpr, lw=1.0, label=c)
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=f"{task['name']}, {split}: ROC",
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    _save(fig, out_dir / "roc.png")

    curve = report["reliability"]
    fig = _figure(6, 6)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    pts = [
        (c, f)
        for c, f in zip(curve["confidence"], curve["frequency"], strict=True)
        if c is not None
    ]
    if pts:
        ax.plot(*zip(*pts, strict=True), marker="o")
    ax.set(
        xlabel="predicted probability" if kind != "multiclass" else "confidence (top class)",
        ylabel="observed frequency",
        title=f"{task['name']}, {split}: reliability (ECE {report['ece']:.3f})",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    _save(fig, out_dir / "reliability.png")
    if kind == "multiclass":
        cm = np.asarray(report["confusion_matrix"])
        fig = _figure(6, 5)
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(cm, cmap="Blues")
        fig.colorbar(im, ax=ax)
        ax.set_xticks(range(len(classes)), classes, rotation=45, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set(xlabel="predicted", ylabel="true", title=f"{task['name']}, {split}: confusion")
        _save(fig, out_dir / "confusion.png")
