"""Test helpers: a synthetic dataset ready to train on (cohort -> store -> splits -> shards),
built through the same library calls as `ecgplat synth | ingest | split | shards`. Used by the
diagnosis and pretraining-benefit tests and by the fixture recipe
`fixtures/pretrained_tiny/make.py`.
"""

from __future__ import annotations

from pathlib import Path

from ingestion.pipeline import ingest
from ingestion.shards import write_shards
from ingestion.splits import split_store
from ingestion.synth import write_cohort


def prepare_synthetic(
    root: str | Path,
    patients: int,
    records_per_patient: int = 1,
    *,
    seconds: float = 10.0,
    seed: int = 0,
    label_fraction: float = 0.5,
    valid: float = 0.2,
    test: float = 0.0,
    split_seed: int | None = None,
    shard_splits: tuple[str, ...] = ("train", "valid"),
    max_count: int = 64,
) -> dict:
    """A synthetic dataset ready to train on, under ``root``: ``cohort/`` (``write_cohort``),
    ``store/`` (ingested in-process, then split at random by patient with ``split_seed``,
    default ``seed``) and ``shards/`` (one shard set per name in ``shard_splits``, at most
    ``max_count`` records per tar). Returns ``{"cohort", "store", "shards"}`` paths and the
    ``split_store`` counts under ``"counts"``."""

    root = Path(root)
    paths = {name: root / name for name in ("cohort", "store", "shards")}
    write_cohort(
        paths["cohort"],
        patients,
        records_per_patient,
        seconds=seconds,
        seed=seed,
        label_fraction=label_fraction,
    )
    ingest("cinc2021", paths["cohort"], paths["store"], workers=0, progress=False)
    counts = split_store(
        paths["store"],
        mode="random",
        valid=valid,
        test=test,
        seed=seed if split_seed is None else split_seed,
    )
    for split in shard_splits:
        write_shards(paths["store"], split, paths["shards"], max_count=max_count)
    return {**paths, "counts": counts}


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random-init `tiny` encoder saved as a pretraining checkpoint (seeded)."""
    import torch

    from training.models import build_encoder, save_checkpoint

    torch.manual_seed(seed)
    enc = build_encoder("tiny")
    return save_checkpoint(
        path,
        kind="pretrain",
        encoder_config=enc.cfg,
        model={f"encoder.{k}": v for k, v in enc.state_dict().items()},
    )
