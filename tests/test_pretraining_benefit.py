"""Pretraining pays off: fine-tuned from a W2V+CMSC+RLM-pretrained `tiny` encoder, a diagnosis
model reaches a higher validation macro AUROC than the random-init baseline trained the same
number of updates with the same seeds (the paper's claim, at toy scale).

The pretrained encoder is the committed fixture `fixtures/pretrained_tiny/` (1000 updates on a
synthetic cohort of its own, 1000 patients, seed 100; `make.py` there regenerates it). It is not
pretrained here because the InfoNCE term of W2V stays at chance for the first ~300 updates:
that is minutes on 2 CPU cores, over a unit-test budget. The fine-tuning cohort is generated
here from other patients (seed 1): 300 one-record patients, half train, half validation. Both
arms are the `diagnosis` preset (CNN frozen, as in the paper) at lr 1e-3 for 30 updates of 16
segments, over three seeds. Over cohort seeds 1-6 of this protocol the mean gap was 0.084-0.113
and all 18 per-seed gaps were positive (smallest +0.058), so the margin asserted below (mean
> 0.04, every seed > 0) leaves room.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from ecgplat.file_hash import file_sha256
from ecgplat.tracking import read_metrics
from training.loop import train
from training.models import load_encoder
from training.run_config import load_config
from training.tasks.diagnosis import DiagnosisTask

FIXTURE = Path(__file__).parent / "fixtures" / "pretrained_tiny"
CHECKPOINT = FIXTURE / "w2v_cmsc_rlm_tiny_synth.pt"
SEEDS = (0, 1, 2)
UPDATES = 30


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    from helpers import prepare_synthetic

    return prepare_synthetic(
        tmp_path_factory.mktemp("benefit"), 300, seed=1, label_fraction=0.75, valid=0.5
    )


def valid_auroc(cohort: dict, out: Path, init: str, seed: int) -> float:
    """Fine-tune (or train from scratch when init is "none") and return the last validation's
    segment-level macro AUROC."""
    torch.set_num_threads(1)
    cfg = load_config(
        "diagnosis",
        [
            "model.preset=tiny",
            f"data.shards={cohort['shards']}",
            f"data.store={cohort['store']}",
            f"out={out}",
            f"finetune.init={init}",
            f"seed={seed}",
            "data.batch_size=16",
            "data.num_workers=0",
            "device=cpu",
            "optim.lr=1e-3",
            f"optim.max_update={UPDATES}",
            "optim.max_epoch=0",
            "logging.wandb_mode=disabled",
            "logging.log_interval=1000",
        ],
    )
    summary = train(cfg, DiagnosisTask(cfg))
    assert summary["num_updates"] == UPDATES
    return read_metrics(out, "valid_auroc_macro")[-1]["valid_auroc_macro"]


def test_fixture_matches_its_provenance():
    record = json.loads((FIXTURE / "provenance.json").read_text())
    assert file_sha256(CHECKPOINT) == record["sha256"]
    assert record["num_updates"] == 1000
    # the recipe left chance: InfoNCE below log2(101) bits, CMSC well below log2(8) bits
    assert record["last_log"]["w2v_loss"] < record["first_log"]["w2v_loss"] - 0.2
    assert record["last_log"]["cmsc_loss"] < 2.0
    encoder = load_encoder(CHECKPOINT)  # strict: the fixture matches today's model
    assert encoder.cfg.encoder_embed_dim == 64


def test_recipe_still_reproduces_the_fixture_run(tmp_path):
    """The recipe run today logs, over its first 25 updates, the losses the fixture's run logged:
    the committed checkpoint is what this code's pretraining produces (a change to the model,
    the objectives, RLM or the data stream shows up here). As a ratio of errors, not a number
    tuned to one CPU: today's log must sit 100x closer to the fixture's than the log of the same
    recipe under another seed (recorded by make.py) does. Measured: relative drift ~1e-8 under
    AVX512, AVX2 and ATen's default kernels; another seed ~5e-2."""
    spec = importlib.util.spec_from_file_location("make_fixture", FIXTURE / "make.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    record = json.loads((FIXTURE / "provenance.json").read_text())
    expected = record["first_log"]
    keys = ("loss", "w2v_loss", "cmsc_loss", "accuracy")

    def error(log: dict) -> float:
        assert log["update"] == expected["update"] == 25
        return float(np.linalg.norm([log[k] / expected[k] - 1 for k in keys]))

    today = error(make.first_log(make.pretrain(tmp_path, 25)))
    other_seed = error(record["other_seed"]["first_log"])
    print(f"relative error of the logged losses: today {today:.2e}, another seed {other_seed:.2e}")
    assert today * 100 < other_seed, (today, other_seed)


def test_pretrained_init_beats_random_init(cohort, tmp_path):
    # the six runs are independent (each seeds itself and runs on one thread): two processes
    # run them, three each, on the two cores the suite has
    runs = [(tmp_path / f"pt{s}", str(CHECKPOINT), s) for s in SEEDS]
    runs += [(tmp_path / f"rnd{s}", "none", s) for s in SEEDS]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        aurocs = list(pool.map(valid_auroc, [cohort] * len(runs), *zip(*runs, strict=True)))
    pretrained, scratch = aurocs[: len(SEEDS)], aurocs[len(SEEDS) :]
    gaps = np.subtract(pretrained, scratch)
    print(
        f"valid macro AUROC, pretrained {np.round(pretrained, 3)} vs random init "
        f"{np.round(scratch, 3)}: gaps {np.round(gaps, 3)}"
    )
    assert np.mean(gaps) > 0.04 and (gaps > 0).all(), (pretrained, scratch)
