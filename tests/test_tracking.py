"""Run tracking: metrics.jsonl, W&B offline files, and no patient keys anywhere."""

import json
import os

import pytest

from ecgplat.tracking import REDACTED, Tracker, log_metrics, sanitize

KEY = "p-0123456789abcdef"


pytestmark = pytest.mark.usefixtures("isolated_wandb")


def _all_bytes(root):
    """Every regular file under ``root`` with its bytes. W&B's ``debug*.log`` links point at the
    run's own log files (walked anyway) and may dangle while its service shuts down."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            if os.path.islink(path):
                continue
            with open(path, "rb") as fh:
                yield path, fh.read()


def test_sanitize_drops_and_redacts_patient_keys():
    clean = sanitize(
        {
            KEY: 1.0,
            "loss": 2.0,
            "note": f"worst {KEY} here",
            "who": KEY,
            "nested": {"list": [KEY, "ok"], f"{KEY}_acc": 3},
        }
    )
    assert clean == {
        "loss": 2.0,
        "note": f"worst {REDACTED} here",
        "who": REDACTED,
        "nested": {"list": [REDACTED, "ok"]},
    }
    assert sanitize({"top-1": 0.5, "pp-abc": 1, "group": "cpu-1"}) == {
        "top-1": 0.5,
        "pp-abc": 1,
        "group": "cpu-1",
    }


def test_offline_run_writes_files_without_patient_keys(tmp_path):
    run = tmp_path / "run"
    cfg = {"data": {"shards": "/x", "note": KEY}, "optim": {"lr": 1e-4}}
    with Tracker(run, config=cfg, mode="offline", project="ecgplat-test", console=False) as t:
        for step in range(1, 4):
            t.log({"loss": 1.0 / step, KEY: 0.5, "worst_patient": KEY}, step=step)
        t.summary({"final_loss": 0.33, "top_patient": KEY})
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["update"] for x in lines] == [1, 2, 3]
    assert [x["loss"] for x in lines] == pytest.approx([1.0, 0.5, 1 / 3])
    assert all(KEY not in x and x["worst_patient"] == REDACTED for x in lines)
    wandb_files = [p for p, _ in _all_bytes(run / "wandb")]
    assert any(p.endswith(".wandb") for p in wandb_files), wandb_files
    for path, data in _all_bytes(tmp_path):
        assert KEY.encode() not in data, path
    assert not (tmp_path / "home" / ".cache" / "wandb").exists()


def test_disabled_mode_and_resume_truncation(tmp_path):
    run = tmp_path / "run"
    with Tracker(run, mode="disabled", console=False) as t:
        for step in range(1, 6):
            t.log({"loss": float(step)}, step=step)
    assert not (run / "wandb").exists()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"update": 6, "loss": 6.')  # torn by a kill
    with Tracker(run, mode="disabled", resume=True, console=False) as t:
        t.truncate_after(3)
        t.log({"loss": 40.0}, step=4)
    assert [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [
        1.0,
        2.0,
        3.0,
        40.0,
    ]
    record = log_metrics(run, {"accuracy": 0.9, "probe": KEY}, mode="disabled")
    assert record["accuracy"] == 0.9 and record["probe"] == REDACTED
    assert json.loads((run / "summary.json").read_text())["probe"] == REDACTED
    with pytest.raises(ValueError, match="unknown W&B mode"):
        Tracker(run, mode="cloud")
