"""CLI for user tasks: `ecgplat labels add|list` (label sets in the store), `ecgplat evaluate
task` (any fine-tuned checkpoint, per kind, with bootstrap intervals) and `ecgplat probe` (a
linear probe on a feature set)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from ecgplat.cli.apps import app, check_device, check_output_path, evaluate_app, fail, require_store
from ecgplat.cli.options import (
    DeviceOption,
    Precision,
    PrecisionOption,
    StoreArgument,
    WandbMode,
    json_option,
)

labels_app = typer.Typer(
    help="Label sets (tasks) in a store: add one from a table, a store field or a vocabulary.",
    no_args_is_help=True,
)
app.add_typer(labels_app, name="labels")

Kind = Literal["auto", "binary", "multiclass", "multilabel", "regression"]
KeyType = Literal["auto", "record_key", "path", "record_id"]
Field = Literal["age", "sex"]
Vocabulary = Literal["cinc26", "ptbxl-scp", "ptbxl-superclass", "code15-chagas"]
Rule = Literal["max_f1", "youden", "fixed"]


@labels_app.command("add")
def labels_add(
    store: StoreArgument,
    name: Annotated[str, typer.Option(help="Task name (letters, digits, _ . -).")],
    table: Annotated[
        Path | None,
        typer.Option(help="CSV or Parquet table keyed by record, with the target column(s)."),
    ] = None,
    key: Annotated[
        str | None, typer.Option(help="The table's key column (record key, path or record id).")
    ] = None,
    target: Annotated[str | None, typer.Option(help="Target column(s), comma-separated.")] = None,
    field: Annotated[Field | None, typer.Option(help="A field the store holds.")] = None,
    vocabulary: Annotated[
        Vocabulary | None, typer.Option(help="A label vocabulary a corpus carries.")
    ] = None,
    kind: Annotated[Kind, typer.Option(help="Task kind; auto infers it from the values.")] = "auto",
    key_type: Annotated[
        KeyType, typer.Option(help="What the key column holds; auto: whichever matches most.")
    ] = "auto",
    positive: Annotated[
        str | None, typer.Option(help="The positive value of a binary target (sex: M or F).")
    ] = None,
    allow_unmatched: Annotated[
        bool,
        typer.Option(help="Leave out table rows whose key matches no record (else an error)."),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a task of the same name.")] = False,
    as_json: Annotated[bool, json_option("Print the task's summary as JSON.")] = False,
) -> None:
    """Add a task (a named label set) to a store; a bad table is refused, nothing is written."""
    from ecgplat.task_build import add_task

    require_store(store)
    targets = [t.strip() for t in target.split(",") if t.strip()] if target else None
    summary = add_task(
        store,
        name,
        table=table,
        key=key,
        targets=targets,
        field=field,
        vocabulary=vocabulary,
        kind=kind,
        key_type=key_type,
        positive=positive,
        allow_unmatched=allow_unmatched,
        overwrite=overwrite,
    )
    summary.pop("file", None)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    classes = ", ".join(summary["classes"][:8]) + (" ..." if len(summary["classes"]) > 8 else "")
    typer.echo(
        f"task {summary['name']}: {summary['kind']} [{classes}], "
        f"{summary['n_labelled']} labelled records"
    )
    for note in summary.get("notes", []):
        typer.echo(f"note: {note}")


@labels_app.command("list")
def labels_list(
    store: StoreArgument,
    as_json: Annotated[bool, json_option("Print the tasks as JSON.")] = False,
) -> None:
    """List a store's tasks (the built-in 26-class `diagnosis` first)."""
    from ecgplat.store import open_store
    from ecgplat.store.task_store import list_tasks

    require_store(store)
    tasks = list_tasks(open_store(store))
    if as_json:
        typer.echo(json.dumps(tasks, indent=2))
        return
    for t in tasks:
        source = ", ".join(f"{k}={v}" for k, v in t["source"].items())
        typer.echo(
            f"{t['name']:<20} {t['kind']:<11} {len(t['classes']):>3} outputs  "
            f"{t['n_labelled']:>8} labelled  ({source})"
        )


def _print_levels(summary: dict) -> None:
    """The headline metrics of each level with their 95 % intervals, one line each."""
    for level, report in summary["levels"].items():
        ci = report.get("ci95", {})
        parts = []
        for key, interval in ci.items():
            value = report.get(key)
            if value is None:
                continue
            band = f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
            parts.append(f"{key} {value:.3f}{band}")
        typer.echo(f"{level} ({report['n']}): " + "; ".join(parts))


@evaluate_app.command("task")
def evaluate_task_cmd(
    checkpoint: Annotated[
        Path, typer.Option(help="Fine-tuned checkpoint (`ecgplat train finetune` or diagnosis).")
    ],
    store: Annotated[Path, typer.Option(help="Feature store holding the records and labels.")],
    split: Annotated[
        str, typer.Option(help="Store split to evaluate (train/valid/test).")
    ] = "test",
    labels: Annotated[
        str | None,
        typer.Option(help="The store's task to score against; default: the checkpoint's task."),
    ] = None,
    leads: Annotated[
        str | None,
        typer.Option(help="Lead subset fed to the model; default: the leads it was trained on."),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option(min=0, help="Patient-level bootstrap replicates (0: no intervals).")
    ] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder (default: eval-<task>-<split> beside the checkpoint)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Segments per inference batch.")] = 64,
    device: DeviceOption = "auto",
    precision: PrecisionOption = Precision.auto,
    as_json: Annotated[bool, json_option("Print the summary as JSON.")] = False,
    wandb_mode: Annotated[
        WandbMode,
        typer.Option(help="W&B run of the evaluation's dashboard: offline, online or disabled."),
    ] = "disabled",
) -> None:
    """Evaluate a fine-tuned model on its task: record- and segment-level metrics with patient
    bootstrap intervals, at the checkpoint's thresholds; metrics.json, predictions.csv, plots."""
    from training.evaluate_task import evaluate_task

    require_store(store, "--store")
    check_device(device)
    if out is not None:
        check_output_path(out, "--out", directory=True)
    if not checkpoint.is_file():
        fail(f"--checkpoint {checkpoint}: no such checkpoint file")
    summary = evaluate_task(
        checkpoint,
        store,
        split,
        out,
        leads=leads,
        labels=labels,
        batch_size=batch_size,
        device=device,
        precision=precision.value,
        n_boot=bootstrap,
        seed=seed,
        progress=not as_json,
        wandb_mode=wandb_mode,
    )
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    task = summary["task"]
    typer.echo(
        f"{task['name']} ({task['kind']}) on {split}: {summary['n_records']} records, "
        f"{summary['n_patients']} patients; thresholds: {task.get('threshold_rule') or 'n/a'}"
    )
    _print_levels(summary)
    typer.echo(f"wrote {summary['out']}/metrics.json")


@app.command("probe")
def probe_cmd(
    store: Annotated[Path, typer.Option(help="Feature store holding the feature set and labels.")],
    features: Annotated[str, typer.Option(help="Feature set name (see `ecgplat embed`).")],
    labels: Annotated[str, typer.Option(help="The store's task to fit (`ecgplat labels list`).")],
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: probe-<features>-<labels>).")
    ] = None,
    threshold_rule: Annotated[
        Rule, typer.Option(help="Per-class thresholds fitted on the valid split.")
    ] = "max_f1",
    bootstrap: Annotated[
        int, typer.Option(min=0, help="Patient-level bootstrap replicates (0: no intervals).")
    ] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap and the solver.")] = 0,
    as_json: Annotated[bool, json_option("Print the summary as JSON.")] = False,
) -> None:
    """Linear probe (logistic regression or ridge, regularisation chosen on valid) on a feature
    set's record embeddings; scored on test like `evaluate task`."""
    from retrieval.probe import run_probe

    require_store(store, "--store")
    if out is not None:
        check_output_path(out, "--out", directory=True)
    summary = run_probe(
        store, features, labels, out, threshold_rule=threshold_rule, n_boot=bootstrap, seed=seed
    )
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    p = summary["probe"]
    typer.echo(
        f"probe {summary['labels']} on {summary['features']}: {p['model']}, C={p['C']:g} "
        f"(best valid {p['metric']} of {len(p['grid'])}), {summary['n_records']} test records"
    )
    _print_levels(summary)
    typer.echo(f"wrote {summary['out']}/metrics.json")
