"""Shared pytest fixtures."""

import os
from pathlib import Path

# `precision=auto` means bf16 on CPUs with native bf16: the suite's numbers must not depend on the
# CPU, so `auto` resolves to fp32 here; tests/test_bf16.py sets bf16 explicitly.
os.environ.setdefault("ECGPLAT_CPU_BF16", "0")

import pytest


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The bundled real ECG samples (``data/samples``; see its ATTRIBUTION.md)."""
    return Path(__file__).parents[1] / "data" / "samples"


# ---- synthetic cohort, store and shards --------------------------------------------------------
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


# ---- object storage --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3():
    """A real S3 API server (moto's, in its own process) on 127.0.0.1 for the whole session; this
    process's AWS variables point at it while it runs (``tests/s3_server.py``). Tests take a fresh
    bucket each with ``s3.new_bucket()`` and are marked ``remote``."""
    pytest.importorskip("s3fs", reason="s3fs is a dev dependency: pip install -e '.[dev]'")
    pytest.importorskip("moto", reason="moto[server] is a dev dependency")
    from s3_server import s3_server

    with s3_server() as server:
        yield server


# ---- the service (`ecgplat serve`) -------------------------------------------------------------

from serve_world import serve_world  # noqa: E402, F401 - a session fixture of the service tests


@pytest.fixture
def isolated_wandb(monkeypatch, tmp_path):
    """W&B with its files under the test's folder and a service of its own. wandb writes logs to
    ~/.cache unless told otherwise, and a service left running by an earlier in-process run (a CLI
    test) keeps that run's environment and log folder."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()
