"""CLI for arrhythmia classification: `ecgplat evaluate diagnosis` and `ecgplat score`.

Both print a rich table (overall metrics, then per class) or, with `--json`, the metric dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from ecgplat.cli.apps import app, check_device, check_output_path, evaluate_app, fail
from ecgplat.cli.options import (
    DeviceOption,
    Level,
    Precision,
    PrecisionOption,
    WandbMode,
    json_option,
    store_option,
)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _print_report(title: str, reports: dict[str, dict], per_class_from: str | None) -> None:
    """One table of overall metrics (a column per report) and, optionally, a per-class table."""
    from rich.console import Console
    from rich.table import Table

    from training.cinc_metrics import REPORT_KEYS

    console = Console()
    table = Table(title=title)
    table.add_column("metric")
    for name in reports:
        table.add_column(name, justify="right")
    for key in (k for k in REPORT_KEYS if k != "per_class"):  # the one-number metrics
        table.add_row(key, *(_fmt(r[key]) for r in reports.values()))
    console.print(table)
    if per_class_from is None:
        return
    per = Table(title=f"per class ({per_class_from})")
    columns: tuple[tuple[str, Literal["left", "right"]], ...] = (
        ("class", "left"),
        ("SNOMED", "left"),
        ("support", "right"),
        ("AUROC", "right"),
        ("F1", "right"),
    )
    for col, justify in columns:
        per.add_column(col, justify=justify)
    for row in reports[per_class_from]["per_class"]:
        per.add_row(
            row["abbreviation"],
            row["class"],
            str(row["support"]),
            _fmt(row["auroc"]),
            _fmt(row["f1"]),
        )
    console.print(per)


def _load_predictions(path: Path):
    """(labels, probabilities, record_keys) from a predictions .npz, or fail naming the problem."""
    import numpy as np

    if not path.is_file():
        fail(f"{path}: no such predictions file")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("labels", "probabilities") if k not in data.files]
            if missing:
                fail(
                    f"{path}: missing array(s) {', '.join(missing)} (expected labels, "
                    "probabilities, record_keys)"
                )
            labels, probs = data["labels"], data["probabilities"]
            keys = data["record_keys"] if "record_keys" in data.files else None
    except (OSError, ValueError, EOFError) as exc:
        fail(f"{path}: not a readable .npz predictions file ({type(exc).__name__})")
    _check_predictions(path, labels, probs, keys)
    return labels.astype(bool), probs.astype(np.float64), keys


def _check_predictions(path: Path, labels, probs, keys) -> None:
    """Fail unless labels are 0/1 (N, C), probabilities finite numbers in [0, 1] of the same
    shape with N >= 1, and record_keys (when present) one per row."""
    import numpy as np

    for name, array in (("labels", labels), ("probabilities", probs)):
        if array.dtype.kind not in "biuf":
            fail(f"{path}: {name} must be numeric, got dtype {array.dtype}")
    if labels.ndim != 2 or labels.shape != probs.shape:
        fail(f"{path}: labels {labels.shape} and probabilities {probs.shape} must both be (N, 26)")
    if len(labels) == 0:
        fail(f"{path}: no rows to score (labels and probabilities are empty)")
    if not np.isin(labels, (0, 1)).all():
        fail(f"{path}: labels must be 0/1 (or boolean)")
    if not np.isfinite(probs).all():
        fail(f"{path}: probabilities contain NaN or infinite values")
    if probs.min() < 0 or probs.max() > 1:
        fail(f"{path}: probabilities must lie in [0, 1]")
    if keys is not None and len(keys) != len(labels):
        fail(f"{path}: record_keys has {len(keys)} entries for {len(labels)} rows")


@app.command("score")
def score(
    predictions: Annotated[
        Path,
        typer.Argument(
            help="Predictions .npz with arrays labels (N,26) bool, probabilities (N,26) float and "
            "record_keys (N,) str, as written by `ecgplat evaluate diagnosis`."
        ),
    ],
    as_json: Annotated[
        bool, json_option("Print the metrics as one JSON object instead of tables.")
    ] = False,
    level: Annotated[
        Level,
        typer.Option(
            help="record: average the probabilities of rows sharing a record key first; "
            "segment: score every row (the paper's unit)."
        ),
    ] = "record",
    threshold: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Probability threshold for a positive prediction."),
    ] = 0.5,
) -> None:
    """Rescore a predictions file: CinC 2021 challenge score, AUROC/AUPRC, F1, exact matches."""
    from training.cinc_metrics import aggregate_records, classification_report

    labels, probs, keys = _load_predictions(predictions)
    if labels.shape[1] != 26:
        fail(f"{predictions}: expected 26 classes, got {labels.shape[1]}")
    if level == "record":
        if keys is None:
            fail(f"{predictions}: --level record needs a record_keys array")
        _, probs, labels = aggregate_records(probs, keys.astype(str), labels)
    report = classification_report(labels, probs, threshold=threshold)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_report(f"{predictions.name}: {len(labels)} {level}s", {level: report}, level)


@evaluate_app.command("diagnosis")
def evaluate_diagnosis_cmd(
    checkpoint: Annotated[
        Path, typer.Option(help="Diagnosis checkpoint (from `ecgplat train diagnosis`).")
    ],
    store: Annotated[Path, store_option("Feature store (Zarr) holding the evaluation split.")],
    split: Annotated[
        str, typer.Option(help="Store split to evaluate (train/valid/test).")
    ] = "test",
    leads: Annotated[
        str,
        typer.Option(
            help="Lead subset fed to the model, absent leads zero-filled: a preset "
            "(12, 6, 4, 3, 2, 1), a comma list such as I,II,V2, or 'all' for every preset."
        ),
    ] = "12",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output directory for metrics.json, predictions.npz and plots "
            "(default: <checkpoint dir>/eval-<split>)."
        ),
    ] = None,
    as_json: Annotated[
        bool, json_option("Print the metrics as one JSON object instead of tables.")
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Segments per inference batch.")] = 64,
    device: DeviceOption = "auto",
    precision: PrecisionOption = Precision.auto,
    wandb_mode: Annotated[
        WandbMode,
        typer.Option(
            help="W&B mode for logging the metrics: offline, online or disabled.",
        ),
    ] = "disabled",
) -> None:
    """Evaluate a diagnosis model on a store split, at segment and record level."""
    from training.evaluate_diagnosis import EvaluationError, evaluate_diagnosis

    out_dir = out if out is not None else checkpoint.parent / f"eval-{split}"
    check_device(device)
    check_output_path(out_dir, "--out", directory=True)
    try:
        summary = evaluate_diagnosis(
            checkpoint,
            store,
            split=split,
            leads=leads,
            out=out_dir,
            batch_size=batch_size,
            device=device,
            precision=precision.value,
            wandb_mode=wandb_mode,
            progress=not as_json,
        )
    except EvaluationError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    results = summary["results"]
    if len(results) == 1:
        ((name, res),) = results.items()
        _print_report(
            f"{split}, leads {name}: {summary['n_records']} records, "
            f"{summary['n_segments']} segments",
            res,
            "record",
        )
    else:
        _print_report(
            f"{split}, record level, by lead set",
            {name: res["record"] for name, res in results.items()},
            None,
        )
    typer.echo(f"wrote {summary['out']}")
