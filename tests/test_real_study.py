"""The real-data pretraining study (`bench/real_study.py`) end to end on the bundled samples with
a few updates: held-out records never reach the pretraining shards, the gallery/probe sets follow
the protocol, the checkpoint matches its provenance and every result is in range."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench import real_study
from ecgplat.file_hash import file_sha256
from ecgplat.store import open_store
from training.models import load_checkpoint

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
UPDATES = 3


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "out"
    real_study.main(
        [
            "--data", str(SAMPLES), "--out", str(out), "--updates", str(UPDATES),
            "--presets", "tiny", "--seeds", "1", "--ft-updates", "2", "--dx-test", "0.5",
            "--precision", "fp32",
        ]
    )  # fmt: skip
    return out


def test_held_out_records_stay_out_of_pretraining(study):
    pool = open_store(study / "pool.zarr").records
    dx = open_store(study / "dx.zarr").records
    train = set(pool["record_key"][pool["split"] == "train"])
    # all of PTB-XL and every diagnosis test record are held out
    assert not train & set(pool["record_key"][pool["source"] == "ptbxl"])
    assert not train & set(dx["record_key"][dx["split"] == "test"])
    # the pretraining shards hold exactly the train split
    info = json.loads((study / "pool_shards" / "_info.json").read_text())
    assert info["train"]["samples"] == len(train) > 0
    # the z-scored corpus is in the pool, marked as such
    z = pool[pool["source"] == "wfdb"]
    assert len(z) == 2 and set(z["split"]) == {"train"}


def test_gallery_probe_follow_the_protocol(study):
    pool = open_store(study / "pool.zarr").records
    ident = pool[pool["ident_split"] != ""]
    counts = pool.groupby("patient_key")["record_key"].count()
    for patient, rows in ident.groupby("patient_key"):
        # one gallery record per patient; the others are probes; singles are distractors
        assert (rows["ident_split"] == "gallery").sum() == 1
        assert (rows["ident_split"] == "probe").sum() == counts[patient] - 1
    assert set(ident["source"]) <= set(real_study.IDENT_SOURCES)
    res = json.loads((study / "results.json").read_text())
    record = res["identification"]["pretrained"]["record"]
    assert record["n_gallery"] == (ident["ident_split"] == "gallery").sum()
    assert record["n_probe"] == (ident["ident_split"] == "probe").sum() > 0
    assert record["chance_rank1"] == pytest.approx(1 / record["n_gallery"])


def test_checkpoint_provenance_and_results(study):
    prov = json.loads((study / "provenance.json").read_text())
    ckpt = study / prov["checkpoint"]
    assert file_sha256(ckpt) == prov["sha256"]
    loaded = load_checkpoint(ckpt)
    assert loaded["num_updates"] == prov["num_updates"] == UPDATES
    assert loaded["config"]["data"]["normalize"] == "zscore"
    # no path of this machine: the run's folders are named relative to the output folder
    for config in (prov["config"], loaded["config"]):
        assert (config["out"], config["data"]["shards"]) == ("pretrain_run", "pool_shards")
    assert prov["data"]["split"]["pool_records"] > 0
    res = json.loads((study / "results.json").read_text())
    assert res["pretraining"]["infonce_chance_bits"] == pytest.approx(math.log2(101))
    for arm in ("pretrained", "random"):
        aurocs = res["diagnosis"]["finetune"][arm]["values"]
        assert len(aurocs) == 1 and all(0 <= a <= 1 for a in aurocs)
    cos = [res["identification"]["pretrained"]["mean_pairwise_cosine"]]
    cos += [r["mean_pairwise_cosine"] for r in res["identification"]["random"]]
    assert all(-1 <= c <= 1 for c in cos)
    assert (study / "pretrain_loss.png").stat().st_size > 1000
    assert "| identification record Rank-1 |" in (study / "table.md").read_text()


def test_random_checkpoint_is_the_seeded_init(study):
    """The random-init arm is a real init: seed-dependent, and the same seed gives the same
    weights (so the pretrained run's own starting point is reproducible)."""
    a = load_checkpoint(study / "random_tiny_seed0.pt")["model"]
    b = load_checkpoint(real_study.random_checkpoint(study / "again.pt", "tiny", 0, "fp32"))
    c = load_checkpoint(real_study.random_checkpoint(study / "other.pt", "tiny", 5, "fp32"))
    key = next(k for k in a if k.endswith("weight") and a[k].ndim == 2)
    assert np.array_equal(a[key].numpy(), b["model"][key].numpy())
    assert not np.array_equal(a[key].numpy(), c["model"][key].numpy())
