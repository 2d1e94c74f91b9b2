"""The training loop: pretraining on real shards, exact resume, SIGTERM, DDP, accumulation,
best checkpoint / patience, checkpoint files (weights_only)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ecgplat.tracking import read_metrics
from training.loop import train
from training.run_config import RunConfig, load_config, preset_names
from training.tasks.base import Task

torch.set_num_threads(1)
ROOT = Path(__file__).parents[1]
# Hang guards only: the waits below end as soon as their condition holds, so a slow or
# crowded machine must not trip them.
HANG_S = 600
TINY = [
    "model.preset=tiny",
    "criterion.num_negatives=10",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.shuffle_buffer=8",
    "logging.log_interval=1",
    "logging.wandb_mode=disabled",
    "optim.max_epoch=0",
]


def losses(run: Path) -> dict[int, float]:
    return {r["update"]: r["loss"] for r in read_metrics(run, "loss")}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# --- a small deterministic task for the loop's arithmetic ------------------------------------

X = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.3


class LinearTask(Task):
    """Least squares on a fixed global batch of 8 rows; rank r gets rows r::world, split in
    `micro` micro-batches. Loss = summed squared error, sample size = rows."""

    name, checkpoint_kind = "toy", "pretrain"
    micro, valid_metrics = 1, None

    def build_model(self):
        return torch.nn.Linear(4, 1)

    def train_batches(self, rank, world, epoch):
        x, y = X[rank::world], Y[rank::world]
        n = x.shape[0] // self.micro
        return [
            {"x": x[i * n : (i + 1) * n], "y": y[i * n : (i + 1) * n]} for i in range(self.micro)
        ]

    def train_step(self, model, batch, num_updates):
        err = model(batch["x"]) - batch["y"]
        return (err**2).sum(), batch["x"].shape[0], {"mse": float((err.detach() ** 2).mean())}

    def validate(self, model, epoch):
        return None if self.valid_metrics is None else {"score": self.valid_metrics[epoch - 1]}


def toy_cfg(out: Path, **optim) -> RunConfig:
    cfg = RunConfig(out=str(out), device="cpu")
    cfg.optim.lr, cfg.optim.max_epoch = 0.05, 1
    cfg.logging.wandb_mode, cfg.logging.log_interval = "disabled", 1
    for k, v in optim.items():
        setattr(cfg.optim, k, v)
    return cfg


def expected_first_update(lr: float) -> tuple[torch.Tensor, float]:
    """Independent computation: grad of the MEAN squared error over all 8 rows, one Adam
    step (m/sqrt(v) = sign(g) on step 1 up to eps). Returns (weights, grad norm)."""
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 1)
    ((model(X) - Y) ** 2).mean().backward()
    grads = torch.cat([model.weight.grad.flatten(), model.bias.grad])
    params = torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    return params - lr * grads / (grads.abs() + 1e-8), float(grads.norm())


def _params(ckpt: dict) -> torch.Tensor:
    return torch.cat([ckpt["model"]["weight"].flatten(), ckpt["model"]["bias"]])


def test_gradient_normalisation_and_update_freq(tmp_path):
    want, gnorm = expected_first_update(0.05)
    for micro in (1, 2, 4):  # one batch of 8 == 2 x 4 == 4 x 2 accumulated micro-batches
        task = LinearTask(toy_cfg(tmp_path / f"m{micro}", update_freq=micro, max_update=1))
        task.micro = micro
        summary = train(task.cfg, task)
        assert summary["num_updates"] == 1
        ckpt = load(tmp_path / f"m{micro}" / "checkpoint_last.pt")
        # Adam's first step is lr*g/(|g|+1e-8) = +-lr per weight whatever the summation order
        assert torch.allclose(_params(ckpt), want, atol=1e-6)
        rec = json.loads((tmp_path / f"m{micro}" / "metrics.jsonl").read_text().splitlines()[0])
        # an 8-row gradient summed in micro-batches: ~sqrt(8)*eps relative, 1e-5 ~ 80 eps
        assert rec["gnorm"] == pytest.approx(gnorm, rel=1e-5)
        assert rec["sample_size"] == 8


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from training import distributed

    train(toy_cfg(Path(out), max_update=1), LinearTask(toy_cfg(Path(out), max_update=1)))
    distributed.teardown()


def test_two_process_ddp_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children need no re-import (spawn costs ~25 s on 2 busy cores)
    procs = mp.start_processes(
        _ddp_worker,
        args=(2, port, str(tmp_path / "ddp")),
        nprocs=2,
        start_method="fork",
        join=False,
    )
    deadline = time.time() + HANG_S
    while not procs.join(timeout=1):
        if time.time() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail(f"DDP workers did not finish in {HANG_S} s")
    one = LinearTask(toy_cfg(tmp_path / "one", max_update=1))
    train(one.cfg, one)
    ddp, single = (
        load(tmp_path / "ddp" / "checkpoint_last.pt"),
        load(tmp_path / "one" / "checkpoint_last.pt"),
    )
    # all-reduced vs one-process gradient sums differ by ~eps; Adam's first step is +-lr anyway
    assert torch.allclose(_params(ddp), _params(single), atol=1e-6)
    assert torch.allclose(_params(ddp), expected_first_update(0.05)[0], atol=1e-6)
    assert len(ddp["rng"]["per_rank"]) == 2  # both ranks' RNG states for resume
    rec = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["sample_size"] == 8  # summed over the ranks
    assert rec["gnorm"] == pytest.approx(expected_first_update(0.05)[1], rel=1e-5)


def test_best_checkpoint_patience_and_keep_last(tmp_path):
    task = LinearTask(toy_cfg(tmp_path / "r", max_epoch=10))
    task.cfg.checkpoint.best_metric, task.cfg.checkpoint.maximize = "score", True
    task.cfg.checkpoint.patience, task.cfg.checkpoint.keep_last = 2, 2
    task.valid_metrics = [0.1, 0.5, 0.3, 0.7, 0.6, 0.65, 0.9, 0.9, 0.9, 0.9]
    summary = train(task.cfg, task)
    # best 0.7 at epoch 4; epochs 5 and 6 do not improve -> stop after epoch 6
    assert (summary["stop_reason"], summary["epochs"], summary["best"]) == ("patience", 6, 0.7)
    assert load(tmp_path / "r" / "checkpoint_best.pt")["num_updates"] == 4
    assert load(tmp_path / "r" / "checkpoint_last.pt")["num_updates"] == 6
    assert sorted(p.name for p in (tmp_path / "r").glob("checkpoint_*.pt")) == [
        "checkpoint_5.pt",
        "checkpoint_6.pt",
        "checkpoint_best.pt",
        "checkpoint_last.pt",
    ]
    valid = read_metrics(tmp_path / "r", "valid_score")
    assert [v["valid_score"] for v in valid] == task.valid_metrics[:6]


def test_metrics_window_record_is_the_window_means(tmp_path):
    """Two updates of hand-set sums, world 2, logged every 2: loss = summed loss / summed size
    in bits, task logs weighted by this rank's sample units, lr/gnorm/sample_size of the last."""
    import math

    from ecgplat.tracking import Tracker
    from training.metrics_window import MetricsWindow
    from training.step import StepResult

    with Tracker(tmp_path, mode="disabled", console=False) as tracker:
        window = MetricsWindow(tracker, log_interval=2, world=2)
        window.add(StepResult(12.0, 8.0, 3, 3, {"acc": 1.5}, 0.1, 2.0), 1, epoch=1)
        assert read_metrics(tmp_path) == []
        window.add(StepResult(4.0, 8.0, 5, 5, {"acc": 0.5, "lr": 9.0}, 0.2, 3.0), 2, epoch=1)
        window.end_epoch()
    (rec,) = read_metrics(tmp_path)
    assert rec["update"] == 2 and rec["epoch"] == 1
    assert rec["loss"] == pytest.approx(16.0 / 16.0 / math.log(2))
    assert (rec["lr"], rec["gnorm"], rec["sample_size"]) == (0.2, 3.0, 8.0)
    assert rec["acc"] == pytest.approx(2.0 / 8)  # (1.5 + 0.5) over 3 + 5 local units
    assert rec["samples_per_s"] > 0
    assert window.train_loss == pytest.approx(16.0 / 16.0 / math.log(2))


def test_checkpointer_best_of_and_patience_bookkeeping(tmp_path):
    from training.checkpointer import Checkpointer, TrainState

    cfg = toy_cfg(tmp_path)
    cfg.checkpoint.best_metric, cfg.checkpoint.patience = "loss", 2  # minimised
    state = TrainState()
    ckpt = Checkpointer(cfg, LinearTask(cfg), None, None, None, state, None)
    seen = [
        ckpt.record_validation(m)
        for m in ({"loss": 3.0}, None, {"other": 1.0}, {"loss": 2.0}, {"loss": float("nan")})
    ]
    assert seen == [True, False, False, True, False]
    assert (state.best, state.bad_validations, ckpt.out_of_patience) == (2.0, 1, False)
    assert ckpt.record_validation({"loss": 2.0}) is False  # equal is not better
    assert (state.bad_validations, ckpt.out_of_patience) == (2, True)


# --- pretraining on real shards ----------------------------------------------------------------


def test_pretraining_loss_falls_via_cli(synth_shards, tmp_path):
    from ecgplat.cli import app

    run = tmp_path / "pre"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "pretrain",
            "--config",
            "w2v_cmsc_rlm",
            "--shards",
            str(synth_shards),
            "--out",
            str(run),
            *TINY,
            "optim.lr=2e-3",
            "optim.max_update=40",
            "optim.update_freq=1",
            "checkpoint.save_interval_updates=20",
        ],
    )
    assert result.exit_code == 0, result.output
    ls = losses(run)
    assert sorted(ls) == list(range(1, 41))
    first, last = sum(ls[u] for u in range(1, 6)) / 5, sum(ls[u] for u in range(36, 41)) / 5
    assert last < 0.8 * first, (first, last)
    ckpt = load(run / "checkpoint_last.pt")
    assert ckpt["kind"] == "pretrain" and ckpt["num_updates"] == 40
    assert ckpt["config"]["model"]["preset"] == "tiny" and ckpt["config"]["data"]["rlm"] is True
    assert any(k.startswith("encoder.") for k in ckpt["model"])
    assert load_config(run / "config.yaml").optim.max_update == 40
    from training.models import load_encoder

    assert load_encoder(run / "checkpoint_last.pt").cfg.encoder_embed_dim == 64


def test_resume_gives_the_same_losses(synth_shards, tmp_path):
    base = TINY + [
        f"data.shards={synth_shards}",
        "data.num_workers=1",
        "optim.update_freq=2",
        "optim.lr=1e-3",
        "data.epoch_batches=6",
        "data.rlm=true",
    ]
    full = load_config("w2v_cmsc_rlm", base + [f"out={tmp_path / 'full'}", "optim.max_update=5"])
    from training.tasks.pretrain import PretrainTask

    train(full, PretrainTask(full))  # 5 updates over 2 epochs of 3 updates
    part = load_config("w2v_cmsc_rlm", base + [f"out={tmp_path / 'part'}", "optim.max_update=2"])
    train(part, PretrainTask(part))
    assert load(tmp_path / "part" / "checkpoint_last.pt")["data_state"]["batches_done"] == 4
    part.optim.max_update = 5
    train(part, PretrainTask(part), resume=True)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for u in a:  # same process, same kernels, same batches: equal up to a few ulps of ~10 bits
        assert b[u] == pytest.approx(a[u], abs=1e-6), u
    fa, fb = (
        load(tmp_path / "full" / "checkpoint_last.pt"),
        load(tmp_path / "part" / "checkpoint_last.pt"),
    )
    for k in fa["model"]:
        assert torch.allclose(fa["model"][k], fb["model"][k], atol=1e-6), k


def test_sigterm_writes_a_checkpoint_that_resumes(synth_shards, tmp_path):
    run = tmp_path / "sig"
    cmd = [
        sys.executable,
        "-c",
        "from ecgplat.cli import app; app()",
        "train",
        "pretrain",
        "--shards",
        str(synth_shards),
        "--out",
        str(run),
        *TINY,
        "optim.max_update=100000",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + HANG_S
        while time.time() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and len(
                (run / "metrics.jsonl").read_text().splitlines()
            ) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err and "--resume" in err
    ckpt = load(run / "checkpoint_last.pt")
    done = ckpt["num_updates"]
    assert done >= 2 and ckpt["optimizer"]["state"]
    from ecgplat.cli import app

    r = CliRunner().invoke(
        app, ["train", "pretrain", "--out", str(run), "--resume", f"optim.max_update={done + 2}"]
    )
    assert r.exit_code == 0, r.output
    assert sorted(losses(run)) == list(range(1, done + 3))
    assert load(run / "checkpoint_last.pt")["num_updates"] == done + 2
    r = CliRunner().invoke(
        app, ["train", "pretrain", "--shards", str(synth_shards), "--out", str(run)]
    )
    assert r.exit_code == 2 and "already holds a training run" in r.output


PRETRAIN_PRESETS = [n for n in preset_names() if load_config(n).task == "pretrain"]


@pytest.mark.parametrize("preset", PRETRAIN_PRESETS)
def test_every_pretraining_preset_trains_one_step(preset, tmp_path):
    from training.tasks.pretrain import PretrainTask

    cfg = load_config(preset, ["model.preset=tiny", "criterion.num_negatives=5"])
    task = PretrainTask(cfg)
    model = task.build_model()
    g = torch.Generator().manual_seed(0)
    batch = {
        "source": torch.randn(4, 12, 2500, generator=g),
        "lead_mask": torch.ones(4, 12, dtype=torch.bool),
        "segment": torch.tensor([0, 1, 0, 1]),
        "group": torch.tensor([0, 0, 1, 1]),
    }
    loss, sample_size, logs = task.train_step(model, batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and sample_size > 0
    assert ("w2v_loss" in logs) == cfg.criterion.w2v
    assert ("cmsc_loss" in logs) == cfg.criterion.cmsc
    if not cfg.criterion.w2v:  # CMSC only: the bare encoder, 2 segments per pair
        assert sample_size == 4 and not hasattr(model, "quantizer")
    task.on_update(model, 1000)
    if cfg.criterion.w2v:
        assert model.quantizer.curr_temp == pytest.approx(max(2 * 0.999995**1000, 0.5))
