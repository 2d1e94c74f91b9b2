"""`ecgplat train TASK`: pretraining and fine-tuning runs on the generic training loop.

Multi-process data parallel: start the same command under torchrun, e.g.
`torchrun --nproc-per-node 2 $(which ecgplat) train pretrain ...`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ecgplat.cli.apps import app, check_output_path, fail
from ecgplat.cli.options import store_option


@app.command("train")
def train_command(
    task: Annotated[
        str,
        typer.Argument(
            help="What to train: pretrain (W2V/CMSC/RLM), diagnosis "
            "(CinC 2021 arrhythmia classes), finetune (any label set of the store, "
            "--labels) or identify (ArcFace patient identification)."
        ),
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Config overrides `section.key=value`, e.g. optim.lr=1e-4 data.batch_size=8 "
            "criterion.loss_weights=[0.1,10]. Unknown keys are rejected.",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            "-c",
            help="Preset name (w2v_cmsc_rlm, w2v_cmsc, w2v, cmsc, diagnosis, finetune, "
            "identification) or a YAML file; default: the task's "
            "preset.",
        ),
    ] = None,
    shards: Annotated[
        str | None,
        typer.Option(
            help="Directory of WebDataset shards written by `ecgplat shards` (data.shards)."
        ),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(help="Run directory: config.yaml, checkpoints, metrics.jsonl, W&B files."),
    ] = ...,  # type: ignore[assignment]  # typer's required-option marker, not a Path
    init: Annotated[
        str | None, typer.Option(help="Checkpoint to fine-tune from (finetune.init).")
    ] = None,
    leads: Annotated[
        str | None,
        typer.Option(
            help="Leads fed to the model: preset 12/6/4/3/2/1 or a comma list such as I,II,V2; "
            "absent leads are zero rows (data.leads)."
        ),
    ] = None,
    store: Annotated[
        str | None,
        store_option("Feature store used for validation and holding the labels (data.store)."),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            help="finetune: the store's label set to fit (`ecgplat labels list`; head.task).",
        ),
    ] = None,
    exclude_overlap: Annotated[
        str | None,
        typer.Option(
            "--exclude-overlap",
            help="Evaluation store whose records must not be trained on "
            "(identify: PhysioNet 2021's HR records are PTB-XL ECGs); the "
            "run reports how many it excluded "
            "(finetune.leakage_exclude_store).",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the interrupted run in --out exactly where its last "
            "checkpoint left off.",
        ),
    ] = False,
    allow_stale: Annotated[
        bool,
        typer.Option(
            "--allow-stale",
            help="Train on shards exported before the store's last `ecgplat split` "
            "(refused by default: their train/valid/test membership is out of date).",
        ),
    ] = False,
) -> None:
    """Train a model; Ctrl-C / SIGTERM writes a checkpoint that --resume continues from."""
    from training.launch import resolve_run_config, write_run_config
    from training.run_config import ConfigError
    from training.tasks import TASKS

    if task not in TASKS:
        fail(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    check_output_path(out, "--out", directory=True)
    try:
        cfg = resolve_run_config(
            task,
            config,
            list(overrides or []),
            shards=shards,
            out=out,
            init=init,
            leads=leads,
            store=store,
            resume=resume,
            exclude_overlap=exclude_overlap,
            labels=labels,
        )
    except (ConfigError, FileExistsError) as e:
        fail(str(e))
    from ecgplat.shard_format import check_current

    try:
        check_current(cfg.data.shards, (cfg.data.train_split, cfg.data.valid_split), allow_stale)
    except ValueError as e:
        fail(str(e))

    from training import distributed
    from training.loop import Interrupted, train

    rank = int(os.environ.get("RANK", "0"))
    write_run_config(cfg)  # rank 0; on --resume: the saved config + overrides
    try:  # other errors go to the app's handler: bad input exits 2, a bug 1 (ecgplat/cli/apps.py)
        summary = train(cfg, TASKS[task](cfg), resume=resume)
    except Interrupted as e:
        if rank == 0:
            typer.echo(f"{e}; continue with: ecgplat train {task} --out {out} --resume", err=True)
        raise typer.Exit(e.exit_code) from None
    finally:
        distributed.teardown()
    if rank == 0:
        best = (
            f", best {summary['best_metric']} {summary['best']:.4g}"
            if summary["best"] is not None
            else ""
        )
        typer.echo(
            f"done: {summary['num_updates']} updates, {summary['epochs']} complete "
            f"epochs (stopped by {summary['stop_reason']}){best}; checkpoint "
            f"{summary['checkpoint']}"
        )
