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

TASKS = ("pretrain", "diagnosis", "identify")
DEFAULT_PRESET = {
    "pretrain": "w2v_cmsc_rlm",
    "diagnosis": "diagnosis",
    "identify": "identification",
}


def check_run_paths(cfg) -> None:
    """ConfigError for a store, checkpoint or shard directory named in the config that does not
    exist, or for device=cuda without a GPU, before anything is written or trained."""
    from training.run_config import ConfigError

    for option, key, value in (
        ("--store", "data.store", cfg.data.store),
        ("--exclude-overlap", "finetune.leakage_exclude_store", cfg.finetune.leakage_exclude_store),
    ):
        if value and not (Path(value) / "zarr.json").is_file():
            raise ConfigError(f"{option} ({key}) {value}: no ecgplat store here")
    init = cfg.finetune.init
    if init and init != "none" and not Path(init).is_file():
        raise ConfigError(f"--init (finetune.init) {init}: no such checkpoint file")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device=cuda: no CUDA device is available here (use auto or cpu)")
    shards = str(cfg.data.shards)
    is_pattern = shards.startswith("pipe:") or "{" in shards or shards.endswith(".tar")
    if shards and not is_pattern and not Path(shards).is_dir():
        raise ConfigError(f"--shards (data.shards) {shards}: no such shard directory")


def resolve_run_config(
    task: str,
    config: str | None,
    overrides: list[str],
    *,
    shards: str | None,
    out: Path,
    init: str | None,
    leads: str | None,
    store: str | None,
    resume: bool,
    exclude_overlap: str | None = None,
):
    """The RunConfig of a new run (preset + options + overrides) or of a resumed one (the run
    directory's `config.yaml` + overrides). Raises ConfigError / FileExistsError."""
    from training.run_config import ConfigError, apply_overrides, load_config

    if resume:
        saved = out / "config.yaml"
        if not (out / "checkpoint_last.pt").is_file() or not saved.is_file():
            raise ConfigError(f"{out}: no checkpoint_last.pt and config.yaml to resume from")
        cfg = load_config(saved, overrides)
        if cfg.task != task:
            raise ConfigError(f"{out}: the run is a '{cfg.task}' run, not '{task}'")
        for name, given in (
            ("--config", config),
            ("--shards", shards),
            ("--init", init),
            ("--leads", leads),
            ("--store", store),
            ("--exclude-overlap", exclude_overlap),
        ):
            if given is not None:
                raise ConfigError(
                    f"{name} cannot change on --resume (the run's config.yaml "
                    f"holds it); pass key=value overrides instead"
                )
        cfg.out = str(out)
        check_run_paths(cfg)
        return cfg
    if (out / "checkpoint_last.pt").exists():
        raise FileExistsError(
            f"{out}: already holds a training run; use --resume to continue "
            f"it or choose another --out"
        )
    cfg = load_config(config or DEFAULT_PRESET[task], [])
    cfg.task = task
    cfg.out = str(out)
    for value, key in (
        (shards, "data.shards"),
        (init, "finetune.init"),
        (leads, "data.leads"),
        (store, "data.store"),
        (exclude_overlap, "finetune.leakage_exclude_store"),
    ):
        if value is not None:
            apply_overrides(cfg, [f"{key}={value}"])
    apply_overrides(cfg, overrides)
    cfg.validate()
    if not cfg.data.shards:
        raise ConfigError("no shard directory: pass --shards DIR")
    check_run_paths(cfg)
    return cfg


@app.command("train")
def train_command(
    task: Annotated[
        str,
        typer.Argument(
            help="What to train: pretrain (W2V/CMSC/RLM), diagnosis "
            "(CinC 2021 arrhythmia classes) or identify "
            "(ArcFace patient identification)."
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
            help="Preset name (w2v_cmsc_rlm, w2v_cmsc, w2v, cmsc, diagnosis, "
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
        str | None, typer.Option(help="Feature store used for validation (data.store).")
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
    from training.run_config import ConfigError

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
        )
    except (ConfigError, FileExistsError) as e:
        fail(str(e))
    from ecgplat.shard_format import check_current

    try:
        check_current(cfg.data.shards, (cfg.data.train_split, cfg.data.valid_split), allow_stale)
    except ValueError as e:
        fail(str(e))

    import importlib

    from training import distributed
    from training.loop import Interrupted, train

    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save_yaml(out / "config.yaml")  # on --resume: the saved config + overrides
    task_module = importlib.import_module(f"training.tasks.{task}")
    try:
        summary = train(cfg, task_module.TASK_CLASS(cfg), resume=resume)
    except Interrupted as e:
        if rank == 0:
            typer.echo(f"{e}; continue with: ecgplat train {task} --out {out} --resume", err=True)
        distributed.teardown()
        raise typer.Exit(e.exit_code) from None
    except (FileNotFoundError, ValueError) as e:
        distributed.teardown()
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__, code=1)
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
