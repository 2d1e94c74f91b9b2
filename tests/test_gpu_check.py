"""bench/gpu_check.sh on a machine without CUDA: the same code as on the GPU, at tiny sizes, so
that the first GPU run does not fail on a typo; its JSON and table hold what the issue asks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "gpu_check.json").read_text()), proc.stdout


def test_every_section_ran_on_the_cpu_at_tiny_sizes(gpu_check):
    report, _ = gpu_check
    assert report["device"] == "cpu" and report["preset"] == "tiny"
    for name in ("pretrain", "ddp", "finetune", "embed", "faiss", "loader"):
        assert "error" not in report[name], (name, report[name])
    p = report["pretrain"]
    # the rates are one measurement seen three ways: segments/s, s/step and TFLOP/s
    assert p["segments_per_s"] == pytest.approx(2 * p["pairs"] / p["step_s"])
    assert p["gemm_share"] == pytest.approx(p["tflops"] / report["gemm_bf16_tflops"])
    assert "mfu" not in p and report["peak_bf16_tflops"] is None  # no datasheet peak on a CPU
    assert p["largest_batch"]["pairs"] == 2 * p["pairs"] <= report["sizes"]["max_pairs"]
    assert report["ddp"]["backend"] == "gloo"
    assert report["ddp"]["over_bare"] == pytest.approx(
        report["ddp"]["segments_per_s"] / p["segments_per_s"]
    )
    lo = report["loader"]
    assert lo["loader_over_step"] == pytest.approx(lo["segments_per_s"] / p["segments_per_s"])
    fa = report["faiss"]
    assert fa["vectors"] == 2000 and fa["cpu"]["search_s"] > 0
    assert "faiss-gpu" in fa["gpu"]["skipped"]
    assert report["cpu"]["flags"]  # the CPU flags (lscpu) the numbers came from


def test_the_table_prints_every_section(gpu_check):
    report, stdout = gpu_check
    for label in ("pretrain tiny bf16", "ddp", "finetune", "embed", "faiss flat", "loader vs step"):
        assert label in stdout
    assert f"{report['pretrain']['segments_per_s']:.3g} segments/s" in stdout


def test_a_failing_section_is_reported_and_the_others_still_run():
    sys.path.insert(0, str(REPO))
    from bench.gpu_check import _section, table

    report = {"device": "cpu", "preset": "tiny"}
    assert _section(report, "finetune", lambda: 1 / 0) is None
    assert _section(report, "embed", lambda: {"segments_per_s": 12.5}) == report["embed"]
    assert report["finetune"]["error"].startswith("ZeroDivisionError")
    text = table(report)
    assert "ZeroDivisionError" in text and "12.5 segments/s" in text
