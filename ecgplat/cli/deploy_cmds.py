"""Commands that take a model out of ecgplat: `ecgplat export` (ONNX / TorchScript with their
metadata) and `ecgplat explain` (Integrated Gradients on one record)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from ecgplat.cli.apps import app, check_output_path, fail, require_store
from ecgplat.cli.options import json_option, store_option


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint to export (any kind).")],
    out: Annotated[Path, typer.Option(help="The file to write (missing folders are created).")],
    fmt: Annotated[
        Literal["onnx", "torchscript"],
        typer.Option("--format", help="onnx (opset 18, for onnxruntime) or torchscript."),
    ] = "onnx",
    encoder_only: Annotated[
        bool,
        typer.Option(
            "--encoder-only",
            help="Export the bare encoder (output: the unit embedding) even when the "
            "checkpoint has a head. Identification and pretraining checkpoints always are.",
        ),
    ] = False,
    as_json: Annotated[bool, json_option("Print the metadata written with the file.")] = False,
) -> None:
    """Export a checkpoint with dynamic batch, the lead mask as an input and its metadata
    (classes, thresholds, normalisation, rate, lead order, input contract, checkpoint SHA-256)."""
    check_output_path(out, "--out", directory=False)
    if not checkpoint.is_file():
        fail(f"{checkpoint}: no such checkpoint file")
    from training.export import export_checkpoint

    meta = export_checkpoint(checkpoint, fmt, out, encoder_only=encoder_only)
    if as_json:
        typer.echo(json.dumps(meta, indent=2))
        return
    outputs = ", ".join(f"{o['name']} {tuple(o['shape'])}" for o in meta["outputs"])
    task = meta["task"]
    what = f"task {task['name']} ({task['kind']}, {len(task['classes'])} outputs)" if task else ""
    typer.echo(
        f"wrote {out} ({fmt}): inputs signal (batch, 12, 2500), lead_mask (batch, 12); "
        f"outputs {outputs}{'; ' + what if what else ''}; "
        f"normalization {meta['normalization']['mode']}"
    )


@app.command("explain")
def explain_cmd(
    checkpoint: Annotated[
        Path, typer.Option(help="A checkpoint with a task head (diagnosis or a fine-tuned task).")
    ],
    out: Annotated[
        Path,
        typer.Option(help="Folder for explanation.json, attributions.npy and explanation.png."),
    ],
    record_file: Annotated[
        Path | None,
        typer.Argument(
            help="A record file of any format ingest reads (WFDB .hea, MUSE/Philips/HL7 XML, "
            "DICOM, SCP-ECG, EDF, ...)."
        ),
    ] = None,
    store: Annotated[Path | None, store_option("Feature store holding --record.")] = None,
    record: Annotated[
        str | None, typer.Option(help="Record key in --store (e.g. cinc2021/E07500).")
    ] = None,
    class_name: Annotated[
        str | None,
        typer.Option(
            "--class", help="Class to explain: its name (for the CinC classes also e.g. AF)."
        ),
    ] = None,
    output: Annotated[
        int | None, typer.Option(help="Output index to explain (e.g. a regression target).")
    ] = None,
    segment: Annotated[int, typer.Option(help="Which 5 s segment of the record.")] = 0,
    steps: Annotated[int, typer.Option(help="Integration steps of Integrated Gradients.")] = 64,
    baseline: Annotated[
        Literal["blur", "zeros"],
        typer.Option(
            help="What the record is compared with: blur (each lead's moving average over "
            "--blur-ms; the default, see docs/operations.md) or zeros (the flat line)."
        ),
    ] = "blur",
    blur_ms: Annotated[
        float, typer.Option(min=2.0, max=5000.0, help="Window of the blur baseline, in ms.")
    ] = 100.0,
    as_json: Annotated[bool, json_option("Print the explanation summary as JSON.")] = False,
) -> None:
    """Attribution of one output to each lead and time step of one record (Integrated
    Gradients): a 12-lead plot with the attribution overlaid and each lead's share."""
    if record and store is None:
        fail("--record needs --store")
    if (record_file is None) == (store is None):
        fail("give either a RECORD_FILE or --store with --record")
    if store is not None and not record:
        fail("--store needs --record KEY")
    check_output_path(out, "--out", directory=True)
    if not checkpoint.is_file():
        fail(f"{checkpoint}: no such checkpoint file")
    segments, mask = (
        _store_record(store, record or "") if store is not None else _record_file(record_file)
    )
    from training.explain import explain_record
    from training.models.deployable import load_deployable

    summary = explain_record(
        load_deployable(checkpoint),
        segments,
        mask,
        out,
        class_name=class_name,
        output=output,
        segment=segment,
        steps=steps,
        baseline=baseline,
        blur_ms=blur_ms,
    )
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    shares = sorted(summary["lead_shares"].items(), key=lambda kv: -kv[1])
    top = ", ".join(f"{lead} {share:.0%}" for lead, share in shares[:4])
    score = summary.get("probability", summary.get("value"))
    typer.echo(
        f"{summary['class']} ({summary['task']}): {score:.4f}; attribution by lead: {top}; "
        f"wrote {out / 'explanation.png'}"
    )


def _record_file(path: Path | None):
    """(segments mV, lead mask) of one record file of any format ingest reads, read as
    `ecgplat predict` reads it (`ingestion.input_files`: its errors never carry a raw id)."""
    from ingestion.input_files import plan_inputs, read_inputs

    path = Path(str(path))
    if path.is_dir():
        fail(f"{path}: a folder; give one record file")
    records = list(read_inputs(plan_inputs([path])))
    if not records:
        fail(f"{path}: no ECG record in this file")
    rec = records[0]
    if rec.error or rec.segments is None or rec.lead_mask is None:
        fail(f"{path}: {rec.error or 'could not be read'}")
    return rec.segments, rec.lead_mask


def _store_record(store: Path, key: str):
    import numpy as np

    from ecgplat.store import open_store

    require_store(store, "--store")
    st = open_store(store)
    hits = np.flatnonzero((st.column("record_key") == key) & st.live)
    if len(hits) == 0:
        fail(f"--record {key}: no such record in {store}")
    i = int(hits[0])
    return st.record_segments(i), st.lead_masks[i]
