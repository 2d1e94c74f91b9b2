"""Shared pytest fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The bundled real ECG samples (``data/samples``; see its ATTRIBUTION.md)."""
    return Path(__file__).parents[1] / "data" / "samples"


# ---- synthetic cohort, store and shards (owned by the store/ingest engineer) -------------------
# Session-scoped and shared: treat them as READ-ONLY (copy with shutil.copytree to modify).

SYNTH_PATIENTS, SYNTH_RECORDS_PER_PATIENT, SYNTH_SECONDS = 24, 3, 10.0


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory) -> Path:
    """24 synthetic patients x 3 records of 10 s (CinC 2021 format, ``#Patient:`` ids SYN00001..),
    written by ``ingestion.synth.write_cohort`` (seed 0); ``synth_manifest.json`` lists them."""
    from ingestion.synth import write_cohort

    out = tmp_path_factory.mktemp("synth") / "cohort"
    write_cohort(out, SYNTH_PATIENTS, SYNTH_RECORDS_PER_PATIENT, seconds=SYNTH_SECONDS, seed=0)
    return out


@pytest.fixture(scope="session")
def synth_store(synth_cohort, tmp_path_factory) -> Path:
    """The cohort ingested in-process (72 records, 144 segments) and split: random by patient
    (valid 0.2, test 0.2, seed 0) plus identification gallery/probe over every patient (first
    record gallery, the other two probe). Open it with ``ecgplat.store.open_store``."""
    from ingestion.pipeline import ingest
    from ingestion.splits import split_store

    store = tmp_path_factory.mktemp("store") / "store"
    ingest("cinc2021", synth_cohort, store, workers=0, progress=False)
    split_store(store, mode="random", valid=0.2, test=0.2, seed=0, ident=True)
    return store


@pytest.fixture(scope="session")
def synth_shards(synth_store, tmp_path_factory) -> Path:
    """WebDataset shards of ``synth_store``: ``train-*.tar`` (at most 16 records per shard) and
    ``valid-*.tar`` plus ``_info.json`` in the returned directory."""
    from ingestion.shards import write_shards

    out = tmp_path_factory.mktemp("shards") / "shards"
    write_shards(synth_store, "train", out, max_count=16)
    write_shards(synth_store, "valid", out, max_count=16)
    return out


# ---- a briefly pretrained tiny encoder (owned by the fine-tuning engineer) ---------------------

PRETRAIN_TINY_UPDATES = 60


@pytest.fixture(scope="session")
def pretrained_tiny(synth_shards, tmp_path_factory) -> Path:
    """``checkpoint_last.pt`` of a ``tiny`` W2V+CMSC+RLM pretraining run (the paper's objective)
    on ``synth_shards``, launched through the CLI: 60 updates of 4 pairs, lr 2e-3, 10 negatives,
    seed 1, on the CPU (about 20-45 s on 2 busy cores). Enough for fine-tuning from it to beat
    random init (tests/test_finetune_benefit.py). READ-ONLY: copy it to modify."""
    from typer.testing import CliRunner

    from ecgplat.cli import app

    run = tmp_path_factory.mktemp("pretrained_tiny") / "run"
    result = CliRunner().invoke(app, [
        "train", "pretrain", "--config", "w2v_cmsc_rlm", "--shards", str(synth_shards),
        "--out", str(run), "model.preset=tiny", "criterion.num_negatives=10",
        "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=16", "optim.lr=2e-3",
        f"optim.max_update={PRETRAIN_TINY_UPDATES}", "optim.update_freq=1", "optim.max_epoch=0",
        "logging.log_interval=1000", "logging.wandb_mode=disabled", "device=cpu", "seed=1"])
    assert result.exit_code == 0, result.output
    return run / "checkpoint_last.pt"
