"""The downstream-task study (`bench/task_study.py`) on the bundled samples at tiny size: its
test split is exactly the records `bench/real_study.py`'s pretraining held out, its probe on
arbitrary features agrees with `ecgplat probe`, and the command writes its table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from bench import real_study, task_study
from ecgplat.store import open_store
from ingestion.pipeline import ingest

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("task_study")
    data = root / "data"  # the three corpora of the pretraining study's split (CODE-15% would
    data.mkdir()  # add only resampling time here)
    for folder in real_study.DX_CORPORA:
        (data / folder).symlink_to(SAMPLES / folder, target_is_directory=True)
    out = root / "out"
    task_study.main(
        [
            "--data", str(data), "--out", str(out), "--seeds", "1", "--ft-updates", "1",
            "--bootstrap", "10", "--tasks", "sex",
        ]
    )  # fmt: skip
    return out


def test_test_split_is_what_pretraining_held_out(study, tmp_path):
    """The pretraining study's diagnosis split, rebuilt in its own store (its corpus order,
    its own pseudonym secret), holds out the same records the task study calls unseen."""
    dx = tmp_path / "dx.zarr"
    for folder, reader, _units in real_study.CORPORA:
        if folder in real_study.DX_CORPORA:
            ingest(reader, SAMPLES / folder, dx, workers=0, progress=False)
    real_study.dx_split(dx, 0.35, seed=0)
    ref = open_store(dx).records
    held = set(ref["record_key"][ref["split"] == "test"]) | set(
        ref["record_key"][ref["source"] == "ptbxl"]
    )
    records = open_store(study / "tasks.zarr").records
    unseen = task_study.unseen_by_pretraining(records)
    dx_sources = records["source"].isin(real_study.DX_CORPORA).to_numpy()
    assert set(records["record_key"][unseen & dx_sources]) == held
    # only unseen records are tested, and every unseen non-PTB-XL record is
    test = (records["split"] == "test").to_numpy()
    assert not (test & ~unseen).any()
    assert (test | (records["source"] == "ptbxl").to_numpy())[unseen].all()
    # PTB-XL patients never straddle two splits
    ptbxl = records[records["source"] == "ptbxl"]
    assert (ptbxl.groupby("patient_key")["split"].nunique() == 1).all()


def test_array_probe_matches_the_library_probe(study):
    """probe_arrays on the stored embeddings gives ecgplat probe's test metrics."""
    from retrieval.features import load_features
    from retrieval.probe import run_probe

    store = study / "tasks.zarr"
    feats = load_features(store, "pretrained", "record")
    args = argparse.Namespace(bootstrap=10)
    mine = task_study.probe_arrays(
        store, "sex", feats.embeddings.astype(np.float64), feats.record_index, args
    )
    lib = run_probe(store, "pretrained", "sex", out=study / "again", n_boot=10)
    assert mine["auroc"]["value"] == pytest.approx(lib["levels"]["record"]["auroc"])


def test_results_and_table(study):
    res = json.loads((study / "results.json").read_text())
    assert set(res["tasks"]) == {"sex"}
    assert res["checkpoint"]["normalize"] == "zscore"
    ft = res["tasks"]["sex"]["finetune"]
    for arm in ("pretrained", "random", "random_mv"):
        assert 0 <= ft[arm][0]["auroc"]["value"] <= 1
    # the paired gap is the difference of the two arms' own evaluations, inside its interval
    for arm in ("random", "random_mv"):
        (gap,) = ft[f"gap_{arm}"]
        expected = ft["pretrained"][0]["auroc"]["value"] - ft[arm][0]["auroc"]["value"]
        assert gap["value"] == pytest.approx(expected, abs=1e-6)
        assert gap["ci95"][0] <= gap["value"] <= gap["ci95"][1]
    assert "/" + str(study).strip("/") not in (study / "results.json").read_text()
    assert "| sex (auroc) | fine-tune | 0 |" in (study / "table.md").read_text()


def test_encoder_ignores_one_global_scale():
    """Why a one-global-scale normalisation would add nothing over millivolts (docs/results.md,
    "Downstream tasks on real ECGs"): the first conv has no bias and is followed by a GroupNorm
    with one group per channel, so the pooled embedding of x and of 7x agree up to GroupNorm's
    eps; a per-lead rescaling (what per-lead z-scoring does) changes it."""
    import torch

    from training.models import build_encoder
    from training.models.pooling import pooled_output

    torch.manual_seed(0)
    enc = build_encoder("tiny").eval()
    x = 0.3 * torch.randn(2, 12, 2500)
    per_lead = torch.linspace(0.5, 2.0, 12)[None, :, None]
    with torch.no_grad():
        a, b, c = (pooled_output(enc, v) for v in (x, 7.0 * x, per_lead * x))
    scale = float(a.abs().max())
    assert float((a - b).abs().max()) < 1e-3 * scale
    assert float((a - c).abs().max()) > 0.05 * scale
