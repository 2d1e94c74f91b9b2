"""Starting a training run: its `RunConfig` from a preset, options and overrides (or from the run
directory on resume), checked before anything is written or trained, and its `config.yaml`.

`ecgplat train TASK` calls `resolve_run_config`, `write_run_config`, then
`training.loop.train(cfg, TASKS[TASK](cfg))`; the `--option` names in the messages are that
command's. Under torchrun every rank resolves the config; rank 0 alone writes it.
"""

from __future__ import annotations

import os
from pathlib import Path

from training.run_config import ConfigError, RunConfig, apply_overrides, load_config
from training.tasks import DEFAULT_PRESET


def check_run_paths(cfg: RunConfig) -> None:
    """ConfigError for a store, checkpoint or shard directory named in the config that does not
    exist, or for device=cuda without a GPU, before anything is written or trained."""
    for option, key, value in (
        ("--store", "data.store", cfg.data.store),
        ("--exclude-overlap", "finetune.leakage_exclude_store", cfg.finetune.leakage_exclude_store),
    ):
        if value and not (Path(value) / "zarr.json").is_file():
            raise ConfigError(f"{option} ({key}) {value}: no ecgplat store here")
    if cfg.task in ("diagnosis", "finetune") and cfg.data.store:
        check_store_split(cfg.data.store)
    if cfg.task in ("diagnosis", "finetune") and cfg.head.task != "diagnosis":
        check_store_task(cfg)
    init = cfg.finetune.init
    if init and init != "none" and not Path(init).is_file():
        raise ConfigError(f"--init (finetune.init) {init}: no such checkpoint file")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device=cuda: no CUDA device is available here (use auto or cpu)")
    shards = str(cfg.data.shards)
    is_pattern = shards.startswith("pipe:") or "{" in shards or shards.endswith(".tar")
    if shards and not is_pattern:
        _check_shard_folder(shards)


def _check_shard_folder(shards: str) -> None:
    """ConfigError for a `--shards` folder that does not exist, or (a URL: object storage,
    HTTP) that holds no `_info.json` manifest."""
    from ecgplat.shard_format import INFO_FILE, read_info
    from ecgplat.store import is_url

    if not is_url(shards):
        if not Path(shards).is_dir():
            raise ConfigError(f"--shards (data.shards) {shards}: no such shard directory")
        return
    try:
        found = read_info(shards) is not None
    except (OSError, ValueError) as e:
        raise ConfigError(f"--shards (data.shards) {shards}: {str(e).splitlines()[0]}") from None
    if not found:
        raise ConfigError(f"--shards (data.shards) {shards}: no {INFO_FILE} (no shard export here)")


def check_store_split(store_path: str) -> None:
    """ConfigError for a `--store` that was never split: diagnosis validates on its valid split
    (when the shards carry none), and a store without one would be passed over without a word."""
    from ecgplat.store import open_store

    if not (open_store(store_path).column("split") != "").any():
        raise ConfigError(
            f"--store (data.store) {store_path}: the store was never split; "
            f"run `ecgplat split {store_path}` first, or leave --store out"
        )


def check_store_task(cfg: RunConfig) -> None:
    """ConfigError unless `data.store` holds the label set `head.task` (a finetune run reads its
    labels there)."""
    from ecgplat.store import open_store
    from ecgplat.store.task_store import list_tasks

    if cfg.task == "diagnosis":
        raise ConfigError(
            f"`train diagnosis` fits the 26 CinC classes; for --labels {cfg.head.task} run "
            "`ecgplat train finetune`"
        )
    if not cfg.data.store:
        raise ConfigError(
            f"--labels (head.task) {cfg.head.task}: the labels live in a store; pass --store"
        )
    names = [t["name"] for t in list_tasks(open_store(cfg.data.store))]
    if cfg.head.task not in names:
        raise ConfigError(
            f"--labels (head.task) {cfg.head.task}: no such task in {cfg.data.store} "
            f"(tasks: {', '.join(names)}; add one with `ecgplat labels add`)"
        )


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
    labels: str | None = None,
) -> RunConfig:
    """The RunConfig of a new run (preset + options + overrides) or of a resumed one (the run
    directory's `config.yaml` + overrides). Raises ConfigError / FileExistsError."""
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
            ("--labels", labels),
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
        (labels, "head.task"),
    ):
        if value is not None:
            apply_overrides(cfg, [f"{key}={value}"])
    apply_overrides(cfg, overrides)
    cfg.validate()
    if not cfg.data.shards:
        raise ConfigError("no shard directory: pass --shards DIR")
    check_run_paths(cfg)
    return cfg


def write_run_config(cfg: RunConfig) -> None:
    """Create the run directory `cfg.out` and write its `config.yaml` (rank 0 only; on resume:
    the saved config with the overrides applied)."""
    if int(os.environ.get("RANK", "0")) == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        cfg.save_yaml(Path(cfg.out) / "config.yaml")
