"""CLI for prediction on new ECGs: `ecgplat predict` (records read like an ingest, or a store
split) -> a predictions file (CSV, Parquet or JSON; columns in docs/formats.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ecgplat.cli.apps import app, check_device, check_output_path, fail, require_store
from ecgplat.cli.data_cmds import FILTER_HELP
from ecgplat.cli.options import (
    DeviceOption,
    Precision,
    PrecisionOption,
    ProgressOption,
    json_option,
    store_option,
)


def _summary(frame, task: dict, out: Path, seconds: float, predictor) -> dict:
    """What the command prints: counts, the positives per class (or the value range)."""
    from ecgplat.leads import LEADS
    from training.prediction_table import LABEL, MULTICLASS_LABEL, VALUE

    ok = frame[frame["error"] == ""]
    summary: dict = {
        "out": str(out),
        "records": len(frame),
        "predicted": len(ok),
        "errors": len(frame) - len(ok),
        "segments": int(ok["n_segments"].sum()),
        "task": task["name"],
        "kind": task["kind"],
        "leads": [LEADS[i] for i in predictor.leads],
        "precision": predictor.precision,
        "checkpoint_sha256": predictor.sha256,
        "seconds": round(seconds, 3),
    }
    if task["kind"] == "regression":
        summary["mean"] = {
            c: float(ok[VALUE + c].mean()) if len(ok) else None for c in task["classes"]
        }
    elif task["kind"] == "multiclass":
        summary["positives"] = {c: int((ok[MULTICLASS_LABEL] == c).sum()) for c in task["classes"]}
    else:
        summary["positives"] = {c: int(ok[LABEL + c].sum()) for c in task["classes"]}
    reasons = frame.loc[frame["error"] != "", "error"].value_counts()
    summary["error_reasons"] = {str(k): int(v) for k, v in reasons.head(5).items()}
    return summary


def _short(name: str) -> str:
    """A CinC class's abbreviation (AF for 164889003); other class names as they are."""
    from ecgplat.labels import ABBREVIATIONS, CLASS_NAMES

    return ABBREVIATIONS[CLASS_NAMES.index(name)] if name in CLASS_NAMES else name


def _print_summary(summary: dict) -> None:
    typer.echo(
        f"{summary['records']} records -> {summary['out']}: {summary['predicted']} predicted "
        f"({summary['segments']} segments), {summary['errors']} could not be read "
        f"[task {summary['task']} ({summary['kind']}), {summary['seconds']:.1f} s]"
    )
    if "positives" in summary:
        top = [(c, n) for c, n in sorted(summary["positives"].items(), key=lambda kv: -kv[1]) if n]
        shown = ", ".join(f"{_short(c)} {n}" for c, n in top[:8])
        more = f" (+{len(top) - 8} more classes)" if len(top) > 8 else ""
        typer.echo(f"  records labelled positive, by class: {shown or 'none'}{more}")
    else:
        means = ", ".join(f"{c} {v:.4g}" for c, v in summary["mean"].items() if v is not None)
        typer.echo(f"  mean prediction: {means or 'n/a'}")
    for reason, n in summary["error_reasons"].items():
        typer.echo(f"  {n} x {reason}")


@app.command("predict")
def predict(
    checkpoint: Annotated[
        Path,
        typer.Option(
            help="Fine-tuned checkpoint (a diagnosis checkpoint, or any task's fine-tune)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Predictions file to write: .csv, .parquet or .json (missing folders created)."
        ),
    ],
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Record files or folders in any format ingest reads (WFDB/CinC, MUSE, Philips, "
            "HL7 aECG, DICOM, SCP-ECG, EDF, numpy .npy/.npz), told by content as `ingest auto` "
            "does; or none with --store/--split.",
            metavar="INPUT",
            show_default=False,
        ),
    ] = None,
    store: Annotated[
        Path | None, store_option("Predict the records of a store split instead of files.")
    ] = None,
    split: Annotated[str | None, typer.Option(help="With --store: the split to predict.")] = None,
    leads: Annotated[
        str | None,
        typer.Option(
            help="Lead subset fed to the model, others zero-filled (a preset 12, 6, 4, 3, 2, 1 "
            "or a comma list such as I,II,V2); default: the leads the checkpoint was "
            "fine-tuned on."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Segments per inference batch.")] = 64,
    device: DeviceOption = "auto",
    precision: PrecisionOption = Precision.auto,
    fs: Annotated[float | None, typer.Option(help="numpy arrays: their sampling rate, Hz.")] = None,
    array_leads: Annotated[
        str | None,
        typer.Option(help="numpy arrays: lead names of their rows, in order (default I..V6)."),
    ] = None,
    units: Annotated[
        str | None,
        typer.Option(
            help="numpy arrays: unit of their values, mV (default), uV or z; wfdb: "
            "accept records in z (z-scored)."
        ),
    ] = None,
    signal_filter: Annotated[str | None, typer.Option("--filter", help=FILTER_HELP)] = None,
    progress: ProgressOption = True,
    as_json: Annotated[bool, json_option("Print the summary as one JSON object.")] = False,
) -> None:
    """Predict new ECGs with a fine-tuned checkpoint: one row per record with a probability per
    class, the labels at the checkpoint's thresholds (or the value, for regression) and the
    checkpoint's SHA-256. No labels needed. A file that cannot be read gets a row with its
    reason and the run goes on; the command fails only when no record could be predicted."""
    import time

    from training.prediction_table import check_format

    files = list(inputs or [])
    if store is not None and files:
        fail("give INPUT files or --store/--split, not both")
    if store is None and split is not None:
        fail("--split needs --store")
    if store is not None and split is None:
        fail("--store needs --split (the split to predict)")
    if store is None and not files:
        fail("no INPUT: give record files or folders, or --store S --split X")
    try:
        check_format(out)
    except ValueError as e:
        fail(f"--out {e}")
    check_output_path(out, "--out", directory=False)
    check_device(device)
    if store is not None:
        require_store(store, "--store")
        if any(v is not None for v in (fs, array_leads, units, signal_filter)):
            fail("--fs, --array-leads, --units and --filter apply to INPUT files, not --store")
    for f in files:
        if not f.exists():
            fail(f"INPUT {f}: no such file or folder")

    from training.predict import load_predictor
    from training.prediction_table import to_frame, write_predictions

    t0 = time.perf_counter()
    predictor = load_predictor(checkpoint, device, precision.value, leads, batch_size)
    if store is not None and split is not None:
        from ecgplat.store import open_store

        st = open_store(store)
        n = int(st.select(split=split).size)
        with _bar(progress and not as_json, n) as bar:
            rows = list(predictor.predict_store(st, split, on_record=bar.advance))
    else:
        from ingestion.input_files import plan_inputs, read_inputs
        from ingestion.readers.options import ReadOptions

        opts = ReadOptions(units=units, fs=fs, leads=array_leads, signal_filter=signal_filter)
        plan = plan_inputs(files, opts)
        if not len(plan):
            fail(f"INPUT {' '.join(map(str, files))}: no files found")
        with _bar(progress and not as_json, len(plan)) as bar:
            rows = predictor.predict_files(
                files, lambda _: read_inputs(plan), on_record=bar.advance
            )
        for row in rows:  # ids met in later records too (ingestion/input_files.py)
            row["record"], row["error"] = plan.redact(row["record"]), plan.redact(row["error"])
    write_predictions(rows, predictor.task, out)
    frame = to_frame(rows, predictor.task)
    summary = _summary(frame, predictor.task, out, time.perf_counter() - t0, predictor)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    if summary["predicted"] == 0:
        first = frame["error"].iloc[0] if len(frame) else "no records found"
        fail(f"none of the {len(frame)} records could be predicted (first: {first}); rows in {out}")


def _bar(enabled: bool, total: int):
    from ecgplat.progress import ProgressBar

    return ProgressBar(enabled, total, "predict", transient=True)
