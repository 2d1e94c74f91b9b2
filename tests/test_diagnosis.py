"""Diagnosis fine-tuning and evaluation on a real synthetic cohort (WFDB-format files ingested
into a Zarr store and WebDataset shards): the classifier head, strict encoder loading, lead-subset
zero-filling, the BCE step, a tiny fine-tune whose validation macro AUROC rises above chance and
above the untrained model, and `ecgplat evaluate diagnosis` / `ecgplat score` round trips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ecgplat.leads import apply_lead_subset, parse_leads
from ecgplat.tracking import read_metrics
from training.cinc_metrics import auroc
from training.models import CheckpointError, build_encoder, build_pretraining_model, save_checkpoint
from training.models.classifier import DiagnosisModel, load_diagnosis_model
from training.run_config import load_config
from training.tasks.diagnosis import DiagnosisTask
from training.tasks.finetune import FINETUNE_DEFAULTS

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """100 synthetic one-record patients (75 % with an abnormality), split train 50 / valid 40 /
    test 10 by patient, with train and valid shards."""
    from helpers import prepare_synthetic

    data = prepare_synthetic(
        tmp_path_factory.mktemp("dx"),
        100,
        seed=1,
        label_fraction=0.75,
        valid=0.4,
        test=0.1,
        split_seed=0,
        max_count=16,
    )
    assert data["counts"]["split"] == {"train": 50, "valid": 40, "test": 10}
    return data


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory) -> Path:
    """A tiny pretraining-kind checkpoint (encoder + quantizer + projections)."""
    torch.manual_seed(0)
    model = build_pretraining_model("tiny")
    path = tmp_path_factory.mktemp("ckpt") / "pretrain.pt"
    save_checkpoint(
        path, kind="pretrain", encoder_config=model.encoder.cfg, model=model.state_dict()
    )
    return path


def run_config(cohort, out, *overrides):
    return load_config(
        "diagnosis",
        [
            "model.preset=tiny",
            f"data.shards={cohort['shards']}",
            f"data.store={cohort['store']}",
            f"out={out}",
            "data.batch_size=16",
            "data.num_workers=0",
            "device=cpu",
            "logging.wandb_mode=disabled",
            "logging.log_interval=1000",
            *overrides,
        ],
    )


def cli(*args):
    from ecgplat.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------ model


def test_head_init_state_keys_and_padding():
    torch.manual_seed(0)
    model = DiagnosisModel(build_encoder("tiny", **FINETUNE_DEFAULTS)).eval()
    d = model.encoder.embed_dim
    bound = math.sqrt(6.0 / (d + 26))  # Xavier-uniform
    assert model.head.weight.shape == (26, d) and model.head.weight.abs().max() <= bound
    assert model.head.weight.abs().max() > 0.5 * bound and not model.head.bias.any()
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "head"}

    # padded frames are left out of the mean (the CNN's GroupNorm, as in the original, still
    # sees the padded samples, so the comparison is against the encoder's own frames)
    x = torch.randn(2, 12, 2500)
    pad = torch.zeros(2, 2500, dtype=torch.bool)
    pad[1, 2000:] = True
    with torch.no_grad():
        logits = model(x, padding_mask=pad)
        frames = model.encoder.extract_features(x, padding_mask=pad).frames
        expected = model.head(torch.stack([frames[0].mean(0), frames[1, :125].mean(0)]))
    assert logits.shape == (2, 26)  # 2000 samples -> 125 frames
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits[1], model.head(frames[1].mean(0)))


def test_strict_load_drops_heads_applies_overrides_and_names_bad_keys(
    cohort, pretrain_ckpt, tmp_path
):
    cfg = run_config(cohort, tmp_path / "run", f"finetune.init={pretrain_ckpt}")
    model = DiagnosisTask(cfg).build_model()
    ckpt = torch.load(pretrain_ckpt, weights_only=True)
    for k, v in model.encoder.state_dict().items():
        torch.testing.assert_close(v, ckpt["model"][f"encoder.{k}"])
    assert any(k.startswith("quantizer.") for k in ckpt["model"])
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "head"}
    enc = model.encoder.cfg
    assert (
        enc.dropout,
        enc.attention_dropout,
        enc.activation_dropout,
        enc.dropout_input,
        enc.feature_grad_mult,
    ) == (0.0, 0.0, 0.1, 0.0, 0.0)
    assert not any(p.requires_grad for p in model.encoder.feature_extractor.parameters())
    assert all(p.requires_grad for p in model.encoder.transformer.parameters())

    imported = tmp_path / "imported.pt"  # fairseq-signals imports carry the same layout
    save_checkpoint(
        imported,
        kind="imported",
        encoder_config=ckpt["encoder_config"],
        model={k: v for k, v in ckpt["model"].items() if k.startswith("encoder.")},
    )
    cfg.finetune.init = str(imported)
    torch.testing.assert_close(
        DiagnosisTask(cfg).build_model().encoder.state_dict(), model.encoder.state_dict()
    )

    broken = dict(ckpt["model"])
    del broken["encoder.layer_norm.weight"]
    broken["encoder.not_a_weight"] = torch.zeros(1)
    bad_path = tmp_path / "broken.pt"
    save_checkpoint(bad_path, kind="pretrain", encoder_config=ckpt["encoder_config"], model=broken)
    cfg.finetune.init = str(bad_path)
    with pytest.raises(CheckpointError) as err:
        DiagnosisTask(cfg).build_model()
    msg = str(err.value)
    assert "broken.pt" in msg and "layer_norm.weight" in msg and "not_a_weight" in msg
    assert "\n" not in msg


def test_train_step_is_bce_sum_and_freeze_finetune_updates(cohort, tmp_path):
    cfg = run_config(cohort, tmp_path / "run", "finetune.freeze_finetune_updates=3")
    task = DiagnosisTask(cfg)
    torch.manual_seed(0)
    model = task.build_model().eval()  # no activation dropout: two forwards agree
    batch = next(iter(task.train_batches(0, 1, 1)))
    assert batch["source"].shape == (16, 12, 2500) and batch["labels"].shape == (16, 26)

    loss, n, logs = task.train_step(model, batch, num_updates=2)
    loss.backward()
    assert n == 16 * 26
    with torch.no_grad():
        z = model(batch["source"], lead_mask=batch["lead_mask"]).double().numpy()
    y = batch["labels"].double().numpy()
    manual = np.sum(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))
    assert float(loss.detach()) == pytest.approx(manual, rel=1e-5)
    assert model.head.weight.grad is not None
    assert all(p.grad is None for p in model.encoder.parameters())  # frozen: update 2 < 3
    assert 0.0 <= logs["em_accuracy"] <= logs["accuracy"] <= 1.0

    task.train_step(model, batch, num_updates=3)[0].backward()  # 3 >= 3: encoder trains
    assert all(p.grad is not None for p in model.encoder.transformer.parameters())


def test_six_lead_preset_zero_fills_v1_to_v6(cohort, tmp_path):
    from ecgplat.store import open_store
    from training.batch import store_batches

    cfg = run_config(cohort, tmp_path / "run", "data.leads=6")
    batch = next(iter(DiagnosisTask(cfg).train_batches(0, 1, 1)))
    x, mask = batch["source"], batch["lead_mask"]
    assert torch.all(x[:, 6:] == 0) and not mask[:, 6:].any()
    assert torch.all(x[:, :6].abs().amax(dim=-1) > 0) and mask[:, :6].all()

    store = open_store(cohort["store"])
    records = store.select(split="valid")[:3]
    six = next(store_batches(store, records, parse_leads("6"), batch_size=4))
    raw = np.concatenate([store.record_segments(i) for i in records])[:4]
    np.testing.assert_array_equal(six["source"].numpy(), apply_lead_subset(raw, parse_leads("6")))
    assert six["record_index"].tolist() == [records[0], records[0], records[1], records[1]]


# ------------------------------------------------------------------------ fine-tune + evaluate


def test_finetune_learns_and_evaluation_round_trips(cohort, pretrain_ckpt, tmp_path):
    from ecgplat.store import open_store
    from training.loop import train

    run = tmp_path / "run"
    # the "pretrained" encoder is untrained here, so its CNN is left trainable (feature_grad_mult 1)
    cfg = run_config(
        cohort,
        run,
        f"finetune.init={pretrain_ckpt}",
        "model.feature_grad_mult=1.0",
        "optim.lr=1e-3",
        "optim.max_update=18",
        "optim.max_epoch=0",
    )
    task = DiagnosisTask(cfg)
    torch.manual_seed(cfg.seed)
    before = task.validate(task.build_model(), epoch=0)
    summary = train(cfg, task)
    assert summary["num_updates"] == 18
    valid = read_metrics(run, "valid_auroc_macro")
    after = valid[-1]["valid_auroc_macro"]
    print(f"valid macro AUROC: untrained {before['auroc_macro']:.3f} -> fine-tuned {after:.3f}")
    assert after > 0.55 and after > before["auroc_macro"] + 0.05, (before["auroc_macro"], after)
    assert {"valid_cinc_score", "valid_record_cinc_score", "valid_record_auroc_macro"} <= set(
        valid[-1]
    )
    assert (run / "checkpoint_best.pt").is_file()

    # validation from the valid shards equals validation from the store's valid split (a
    # single-file shard source cannot name the valid split, so the store is used)
    model, _ = load_diagnosis_model(run / "checkpoint_last.pt")
    from_shards = task.validate(model, epoch=99)
    store_cfg = run_config(
        cohort, tmp_path / "run2", f"data.shards={cohort['shards']}/train-000000.tar"
    )
    store_task = DiagnosisTask(store_cfg)
    assert store_task.valid_source() == ("store", str(cohort["store"]))
    from_store = store_task.validate(model, epoch=99)
    assert from_store == pytest.approx(from_shards)
    assert from_store["auroc_macro"] == pytest.approx(after)

    out = tmp_path / "eval"
    res = cli(
        "evaluate",
        "diagnosis",
        "--checkpoint",
        run / "checkpoint_last.pt",
        "--store",
        cohort["store"],
        "--split",
        "test",
        "--leads",
        "all",
        "--json",
        "--out",
        out,
        "--precision",
        "fp32",  # compared below with an fp32 forward (auto is bf16 on CPUs with native bf16)
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary == json.loads((out / "metrics.json").read_text())
    assert summary["precision"] == "fp32"
    assert list(summary["results"]) == ["12", "6", "4", "3", "2", "1"]
    assert summary["n_records"] == 10 and summary["n_segments"] == 20
    for name in summary["results"]:
        assert (out / f"roc_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "lead_sets.png").read_bytes()[:4] == b"\x89PNG"

    # predictions equal an independent forward pass over the store's segments
    store = open_store(cohort["store"])
    records = store.select(split="test")
    raw = torch.from_numpy(np.concatenate([store.record_segments(i) for i in records]))
    for name in ("12", "6"):
        with np.load(out / f"predictions_{name}.npz") as pred:
            probs, labels, keys = pred["probabilities"], pred["labels"], pred["record_keys"]
        x = apply_lead_subset(raw, parse_leads(name))
        with torch.no_grad():
            direct = torch.sigmoid(model(x)).numpy()
        np.testing.assert_allclose(probs, direct, atol=1e-5)
        np.testing.assert_array_equal(labels, np.repeat(store.labels[records], 2, axis=0))
        assert (
            keys.tolist() == np.repeat(store.records["record_key"].to_numpy()[records], 2).tolist()
        )
        seg = summary["results"][name]["segment"]
        assert seg["auroc_micro"] == pytest.approx(auroc(labels, probs, "micro"))
        rescored = cli("score", out / f"predictions_{name}.npz", "--level", "segment", "--json")
        assert rescored.exit_code == 0, rescored.output
        again = json.loads(rescored.output)
        for key in ("challenge_score", "auroc_macro", "auprc_micro", "f1_micro", "accuracy"):
            assert again[key] == pytest.approx(seg[key]), key
        rec = json.loads(cli("score", out / f"predictions_{name}.npz", "--json").output)
        assert rec["challenge_score"] == pytest.approx(
            summary["results"][name]["record"]["challenge_score"]
        )
    with np.load(out / "predictions_12.npz") as p12, np.load(out / "predictions_6.npz") as p6:
        assert not np.allclose(p12["probabilities"], p6["probabilities"])


def test_evaluate_rejects_bad_input(cohort, pretrain_ckpt, tmp_path):
    res = cli("evaluate", "diagnosis", "--checkpoint", pretrain_ckpt, "--store", cohort["store"])
    assert (
        res.exit_code != 0 and "pretrain.pt" in res.output and "not a diagnosis model" in res.output
    )

    torch.manual_seed(0)
    model = DiagnosisModel(build_encoder("tiny"))
    ckpt = tmp_path / "dx.pt"
    save_checkpoint(
        ckpt, kind="diagnosis", encoder_config=model.encoder.cfg, model=model.state_dict()
    )
    res = cli(
        "evaluate",
        "diagnosis",
        "--checkpoint",
        ckpt,
        "--store",
        cohort["store"],
        "--split",
        "nope",
        "--out",
        tmp_path / "e",
    )
    assert res.exit_code != 0 and "nope" in res.output and "no records" in res.output
    res = cli(
        "evaluate",
        "diagnosis",
        "--checkpoint",
        ckpt,
        "--store",
        cohort["store"],
        "--leads",
        "I,XX",
        "--out",
        tmp_path / "e",
    )
    assert res.exit_code != 0 and "XX" in res.output
    res = cli("evaluate", "diagnosis", "--checkpoint", ckpt, "--store", tmp_path / "missing")
    assert res.exit_code != 0 and "missing" in res.output
    assert not (tmp_path / "e").exists()
