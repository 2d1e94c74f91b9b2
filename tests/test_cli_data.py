"""The data commands through the real typer app: synth, ingest, split, shards, info."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ecgplat.cli import app
from ecgplat.store import open_store

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_synth_ingest_split_shards_info(tmp_path):
    cohort, store, shards = tmp_path / "cohort", tmp_path / "store", tmp_path / "shards"
    r = invoke(
        "synth", cohort, "--patients", 6, "--records-per-patient", 2, "--seconds", 6, "--seed", 3
    )
    assert r.exit_code == 0, r.output
    assert "12 records" in r.stdout
    r = invoke(
        "ingest", "cinc2021", cohort, "--store", store, "--workers", 0, "--no-progress", "--json"
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert (summary["records"], summary["segments"], summary["patients"]) == (12, 12, 6)
    r = invoke("split", store, "--valid", 0.2, "--test", 0.2, "--ident-first-two")
    assert r.exit_code == 0, r.output
    r = invoke(
        "shards", store, "--split", "train", "--out", shards, "--max-count", 3, "--no-progress"
    )
    assert r.exit_code == 0, r.output
    r = invoke("info", store, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    frame = open_store(store).records
    assert info["records"] == 12 and info["segments"] == 12 and info["patients"] == 6
    assert info["per_source"] == {"cinc2021": 12}
    assert info["per_split"] == {
        k: int(v) for k, v in frame["split"].value_counts().sort_index().items()
    }
    assert info["per_ident_split"] == {"gallery": 6, "probe": 6}
    assert info["rejects"] == 0
    r = invoke("info", store)
    assert r.exit_code == 0 and "records 12" in r.stdout
    # privacy: the synthetic raw ids (SYN0000x) appear in no output and no shard byte
    outputs = r.stdout + json.dumps(summary) + json.dumps(info)
    assert "SYN0" not in outputs
    for p in shards.iterdir():
        assert b"SYN0" not in p.read_bytes() and "SYN" not in p.name
    assert all("SYN" not in v for v in frame.select_dtypes(object).to_numpy().ravel())


@pytest.mark.parametrize(
    "args, message",
    [
        (["ingest", "nope", ".", "--store", "s"], "unknown corpus"),
        (["ingest", "cinc2021", "/nonexistent/src", "--store", "s"], "does not exist"),
        (["info", "/nonexistent/store"], "no ecgplat store"),
        (["split", "/nonexistent/store"], "no ecgplat store"),
        (["shards", "/nonexistent/store", "--split", "train", "--out", "o"], "no ecgplat store"),
        (["split", "{store}", "--mode", "bogus"], "unknown split mode"),
        (["shards", "{store}", "--split", "nosuch", "--out", "{tmp}/o"], "no records in split"),
        (["synth", "{store}"], "not empty"),
    ],
)
def test_misuse_exits_nonzero_with_one_line(args, message, synth_store, tmp_path):
    args = [a.format(store=synth_store, tmp=tmp_path) for a in args]
    r = invoke(*args)
    assert r.exit_code == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_missing_required_option_is_a_usage_error():
    r = invoke("ingest", "cinc2021", ".")
    assert r.exit_code != 0


def test_console_script_exit_code(tmp_path):
    exe = Path(sys.executable).with_name("ecgplat")
    proc = subprocess.run(
        [str(exe), "ingest", "bogus", str(tmp_path), "--store", str(tmp_path / "s")],
        check=False,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown corpus") and proc.stdout == ""
