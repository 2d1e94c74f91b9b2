"""Evaluation of diagnosis models: batched inference, segment/record reports, files and plots.

`evaluate_diagnosis(checkpoint, store, split, leads, out)` runs a diagnosis checkpoint over
every segment of a store split, once per lead set (a preset, a comma list, or "all" = each of
12/6/4/3/2/1; absent leads zero-filled in their canonical slots), and writes to `out`:

* `metrics.json`: for each lead set the classification report (`training.cinc_metrics`) at segment
  level (the paper's unit) and record level (segment probabilities averaged per record);
* `predictions.npz` (one lead set) or `predictions_<leads>.npz` (several): one row per segment,
  `labels` (N, 26) bool, `probabilities` (N, 26) float32, `record_keys` (N,) str,
  `record_index`, `segment_index`: rescore with `ecgplat score`;
* `roc_<leads>.png`: per-class ROC curves (record level); `lead_sets.png`: CinC score and
  macro AUROC across lead sets (record level), when more than one lead set is evaluated;
* with W&B on (`wandb_mode`): metrics, per lead set the record-level dashboard of
  `training.dashboard` (per-class table, ROC, PR, calibration, confusion counts), the plots and
  the checkpoint as an artifact with its store's lineage, in `out/wandb` (and `metrics.jsonl`).

The inference helpers (`predict`, `reports`, `flat_metrics`) are shared with the diagnosis
task's per-epoch validation; batches come from `training.batch.store_batches`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ecgplat.atomic import atomic_path
from ecgplat.leads import LEAD_PRESETS, LEADS, apply_lead_subset, lead_mask, parse_leads
from ecgplat.progress import ProgressBar
from training.batch import store_batches
from training.cinc_metrics import REPORT_KEYS, aggregate_records, classification_report, roc_curve


class EvaluationError(Exception):
    """An evaluation that cannot run; the message is one line naming the file and the reason."""


@dataclass
class Predictions:
    probabilities: np.ndarray  # (N, C) float32, sigmoid outputs
    labels: np.ndarray  # (N, C) bool
    record_index: np.ndarray  # (N,) int64 store record index
    segment_index: np.ndarray  # (N,) int64 segment number within its record


# --------------------------------------------------------------------------- inference


def predict_lead_sets(
    model: torch.nn.Module,
    batches: Iterable[dict],
    lead_sets: dict[str, tuple[int, ...] | None],
    precision: str = "auto",
) -> dict[str, Predictions]:
    """Sigmoid outputs of `model` (a DiagnosisModel, already in eval mode) for every batch and
    every lead set (None = the batch as given; else the leads outside the set zero-filled, in
    addition to what the batch already zeroes), under `precision`'s autocast (auto | fp32 |
    bf16). Each batch is read once, one batch ahead of the model in a thread."""
    from training.precision import autocast as precision_autocast
    from training.prefetch import prefetch

    device = next(model.parameters()).device
    autocast = precision_autocast(precision, device)
    out: dict[str, dict[str, list]] = {
        name: {"p": [], "y": [], "r": [], "s": []} for name in lead_sets
    }
    with torch.inference_mode():
        for batch in prefetch(batches, depth=2):
            x, mask = batch["source"], batch["lead_mask"].bool()
            for name, leads in lead_sets.items():
                xs, ms = x, mask
                if leads is not None and len(leads) < len(LEADS):
                    xs = apply_lead_subset(x, leads)
                    ms = mask & torch.from_numpy(lead_mask(leads))
                with autocast:
                    logits = model(xs.to(device), lead_mask=ms.to(device))
                acc = out[name]
                acc["p"].append(torch.sigmoid(logits.float()).cpu().numpy())
                acc["y"].append(batch["labels"].numpy() > 0.5)
                acc["r"].append(batch["record_index"].numpy())
                seg = batch.get("segment_index")
                acc["s"].append(seg.numpy() if seg is not None else np.zeros(len(x), np.int64))
    result = {}
    for name, acc in out.items():
        if not acc["p"]:
            n = model.num_classes
            result[name] = Predictions(
                np.zeros((0, n), np.float32),
                np.zeros((0, n), bool),
                np.zeros(0, np.int64),
                np.zeros(0, np.int64),
            )
            continue
        result[name] = Predictions(
            np.concatenate(acc["p"]).astype(np.float32),
            np.concatenate(acc["y"]),
            np.concatenate(acc["r"]).astype(np.int64),
            np.concatenate(acc["s"]).astype(np.int64),
        )
    return result


def predict(
    model: torch.nn.Module, batches: Iterable[dict], precision: str = "auto"
) -> Predictions:
    """Sigmoid outputs for batches as given (their lead subset already applied)."""
    return predict_lead_sets(model, batches, {"": None}, precision)[""]


def reports(pred: Predictions, threshold: float = 0.5) -> dict[str, dict]:
    """{"segment": report, "record": report} (record: probabilities averaged per record)."""
    _, rec_p, rec_y = aggregate_records(pred.probabilities, pred.record_index, pred.labels)
    return {
        "segment": classification_report(pred.labels, pred.probabilities, threshold),
        "record": classification_report(rec_y, rec_p, threshold),
    }


def flat_metrics(level_reports: dict[str, dict]) -> dict[str, float]:
    """Validation dict for the training loop: segment metrics unprefixed (challenge score as
    `cinc_score`), record metrics as `record_*`; undefined values left out."""
    flat: dict[str, float] = {}
    for level, prefix in (("segment", ""), ("record", "record_")):
        for key in REPORT_KEYS[:-1]:
            value = level_reports[level][key]
            if value is not None:
                name = "cinc_score" if key == "challenge_score" else key
                flat[prefix + name] = float(value)
    return flat


# --------------------------------------------------------------------------- files and plots


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def save_predictions(path: Path, pred: Predictions, record_keys: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                labels=pred.labels,
                probabilities=pred.probabilities,
                record_keys=np.asarray(record_keys[pred.record_index], dtype=str),
                record_index=pred.record_index,
                segment_index=pred.segment_index,
            )

    _atomic_write(path, write)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_roc_curves(labels: np.ndarray, probabilities: np.ndarray, title: str, path: Path) -> None:
    """One panel with the ROC curve of every class that has both label values."""
    from ecgplat.labels import ABBREVIATIONS

    fig = _figure(8, 7)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    report = classification_report(labels, probabilities)["per_class"]
    for k in range(labels.shape[1]):
        fpr, tpr = roc_curve(labels[:, k], probabilities[:, k])
        if fpr.size:
            ax.plot(fpr, tpr, lw=1.0, label=f"{ABBREVIATIONS[k]} ({report[k]['auroc']:.3f})")
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=title,
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
    )  # keep curves on the frame visible
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_lead_sets(results: dict[str, dict], path: Path) -> None:
    """Grouped bars: record-level CinC score and macro AUROC for each lead set."""
    names = list(results)
    cinc = [results[n]["record"]["challenge_score"] or 0.0 for n in names]
    auc = [results[n]["record"]["auroc_macro"] or 0.0 for n in names]
    fig = _figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    pos = np.arange(len(names))
    ax.bar(pos - 0.2, cinc, width=0.4, label="CinC 2021 score")
    ax.bar(pos + 0.2, auc, width=0.4, label="macro AUROC")
    ax.set_xticks(pos, [f"{n}-lead" if n in LEAD_PRESETS else n for n in names])
    ax.set(ylabel="record level", title="Diagnosis by lead set", ylim=(min(0.0, *cinc), 1.0))
    ax.legend()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


# --------------------------------------------------------------------------- the evaluation


def resolve_lead_sets(leads: str) -> dict[str, tuple[int, ...]]:
    """ "all" -> every preset; a preset or comma list -> that one set. ValueError if bad."""
    if str(leads).strip().lower() == "all":
        return {name: parse_leads(name) for name in LEAD_PRESETS}
    return {str(leads).strip(): parse_leads(leads)}


def evaluate_diagnosis(
    checkpoint: str | Path,
    store: str | Path,
    split: str = "test",
    leads: str = "12",
    out: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    wandb_mode: str = "disabled",
    threshold: float = 0.5,
    progress: bool = False,
) -> dict:
    """Evaluate a diagnosis checkpoint on a store split (see the module docstring); returns the
    summary that is also written to `out/metrics.json`. Raises EvaluationError."""
    from ecgplat.store import open_store
    from training.distributed import pick_device
    from training.models.checkpoint_file import CheckpointError
    from training.models.classifier import load_diagnosis_model
    from training.normalize import mode_of, normalize_store_batches
    from training.precision import resolve_precision

    try:
        lead_sets = resolve_lead_sets(leads)
    except ValueError as e:
        raise EvaluationError(f"--leads {leads}: {e}") from None
    try:
        model, ckpt = load_diagnosis_model(checkpoint)
    except CheckpointError as e:
        raise EvaluationError(str(e)) from None
    try:
        st = open_store(store)
    except (FileNotFoundError, ValueError) as e:
        raise EvaluationError(str(e)) from None
    try:
        records = st.select(split=split)
    except KeyError as e:  # a store written by another schema revision
        raise EvaluationError(
            f"{store}: store lacks the array {e} (written by another ecgplat version?)"
        ) from None
    if records.size == 0:
        present = sorted(set(st.records["split"]) - {""})
        raise EvaluationError(
            f"{store}: split '{split}' has no records "
            f"(splits present: {', '.join(present) or 'none; run ecgplat split'})"
        )
    try:
        dev = pick_device(device)
    except (RuntimeError, ValueError) as e:
        raise EvaluationError(f"--device {device}: {e}") from None
    model.to(dev)

    n_seg = int(st.records["seg_count"].to_numpy()[records].sum())
    with ProgressBar(progress, len(records), f"evaluate {split}", transient=True) as bar:
        preds = predict_lead_sets(
            model,
            normalize_store_batches(
                st,
                store_batches(st, records, batch_size=batch_size, on_record=bar.advance),
                mode_of(ckpt),
            ),
            lead_sets,
            precision,
        )

    out_dir = Path(out) if out is not None else Path(checkpoint).parent / f"eval-{split}"
    out_dir.mkdir(parents=True, exist_ok=True)
    record_keys = st.records["record_key"].to_numpy().astype(str)
    results, files = {}, {}
    for name, pred in preds.items():
        results[name] = reports(pred, threshold)
        fname = "predictions.npz" if len(preds) == 1 else f"predictions_{_slug(name)}.npz"
        save_predictions(out_dir / fname, pred, record_keys)
        files[name] = fname
        _, rec_p, rec_y = aggregate_records(pred.probabilities, pred.record_index, pred.labels)
        plot_roc_curves(
            rec_y,
            rec_p,
            f"{split}, leads {name}: per-class ROC (record level)",
            out_dir / f"roc_{_slug(name)}.png",
        )
    if len(results) > 1:
        plot_lead_sets(results, out_dir / "lead_sets.png")

    summary = {
        "checkpoint": str(checkpoint),
        "store": str(store),
        "split": split,
        "n_records": int(records.size),
        "n_segments": n_seg,
        "threshold": threshold,
        "lead_sets": {name: [LEADS[i] for i in idx] for name, idx in lead_sets.items()},
        "trained_leads": ckpt.get("extra", {}).get("leads"),
        "precision": resolve_precision(precision, dev),
        "results": results,
        "predictions": files,
        "out": str(out_dir),
    }
    _atomic_write(
        out_dir / "metrics.json",
        lambda tmp: tmp.write_text(json.dumps(summary, indent=2, allow_nan=False)),
    )
    if wandb_mode != "disabled":
        _log_dashboard(checkpoint, ckpt, st, split, leads, results, preds, out_dir, wandb_mode)
    return summary


def _log_dashboard(checkpoint, ckpt, store, split, leads, results, preds, out_dir, mode) -> None:
    """The evaluation's W&B run: metrics, per lead set the record-level dashboard
    (`training.dashboard`), the ROC plots, and the checkpoint with the store's lineage."""
    from training.dashboard import log_evaluation, store_lineage
    from training.tasks.heads import task_of_checkpoint

    task = task_of_checkpoint(ckpt)
    levels = []
    for name, pred in preds.items():
        _, rec_p, rec_y = aggregate_records(pred.probabilities, pred.record_index, pred.labels)
        levels.append((f"{_slug(name)}/record/", task, rec_y, rec_p))
    log_evaluation(
        out_dir,
        mode=mode,
        name=f"eval-{split}",
        config={"checkpoint": str(checkpoint), "split": split, "leads": leads},
        metrics={
            f"{_slug(name)}/{k}": v
            for name, res in results.items()
            for k, v in flat_metrics(res).items()
        },
        levels=levels,
        images={f"{_slug(n)}/roc_png": out_dir / f"roc_{_slug(n)}.png" for n in preds}
        | {"lead_sets_png": out_dir / "lead_sets.png"},
        checkpoint=checkpoint,
        lineage={"store": store_lineage(store), "init": (ckpt.get("extra") or {}).get("init")},
    )


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)
