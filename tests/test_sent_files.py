"""`--send-bytes` (ingestion/sent_files.py) against hostile sizes and dying workers (issue 20):
the driver checks a header (rate, duration, data-file sizes) before it reads any data file, so a
header declaring hours of samples costs it a `stat` and ends with the same reject as without
--send-bytes; and the record files a worker lays out are gone after the run, even when the
worker was killed in the middle of a record."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hostile_files import declare_samples, measured, write_cinc, write_wfdb

from ecgplat.store import open_store
from ingestion.pipeline import ingest

REPO = Path(__file__).parents[1]
MIB = 1 << 20
N_SAMPLES = 10_000_000  # 20,000 s at 500 Hz: a 240 MB sparse data file


def _bomb(root: Path, kind: str) -> tuple[str, str]:
    """(corpus, record) of a record declaring N_SAMPLES, beside a good one."""
    if kind == "cinc2021":
        write_cinc(root / "g1", "good")
        declare_samples(write_cinc(root / "g1", "huge"), N_SAMPLES)
        return "cinc2021", "g1/huge"
    write_wfdb(root, "good", n_sig=12, fs=500)
    declare_samples(write_wfdb(root, "huge", n_sig=12, fs=500), N_SAMPLES, kind == "wfdb")
    return "wfdb", "huge"


KINDS = ["wfdb", "wfdb-no-length", "cinc2021"]


@pytest.mark.parametrize("kind", KINDS)
def test_driver_reads_no_data_file_of_a_header_it_refuses(tmp_path, kind):
    _, rel = _bomb(tmp_path / "src", kind)
    setup = "from ingestion.readers.options import ReadOptions\n"
    setup += "from ingestion.sent_files import SentSource"
    code = """
payload = SentSource(sys.argv[1]).read([sys.argv[2]], ReadOptions())
result = {k: list(v) if isinstance(v, tuple) else len(v) for k, v in payload.items()}
"""
    r = measured(REPO, setup, code, tmp_path / "src", rel)
    data = [k for k in r if k.endswith((".dat", ".mat"))]
    assert len(data) == 1, r
    size = (tmp_path / "src" / data[0]).stat().st_size
    assert r[data[0]] == ["size", size], f"the driver shipped {r[data[0]]} bytes, not the size"
    grown = (r["peak"] - r["before"]) / MIB
    assert grown < 16, f"the driver's peak RSS grew {grown:.0f} MiB"
    assert r["seconds"] < 5, r


@pytest.mark.parametrize("kind", KINDS)
def test_send_bytes_rejects_as_reading_src_does(tmp_path, kind):
    corpus, rel = _bomb(tmp_path / "src", kind)
    for name, send in (("sent", True), ("read", False)):
        summary = ingest(
            corpus, tmp_path / "src", tmp_path / name, workers=0, progress=False, send_bytes=send
        )
        assert summary["records"] == 1, summary
    sent, read = (open_store(tmp_path / n).rejects for n in ("sent", "read"))
    assert sent["path"].tolist() == read["path"].tolist() == [rel]
    assert sent["reason"].tolist() == read["reason"].tolist()
    assert sent["reason"][0].startswith("duration 20000 s exceeds the maximum 3600 s")


# ---- record folders of killed workers ------------------------------------------------------

_HOLD = """
import os, signal, sys
from ingestion.sent_files import record_folder
with record_folder() as src:
    (src / "rec.hea").write_text("raw signal file")
    print(src, flush=True)
    if sys.argv[1] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()
"""


def _holder(how: str, env: dict) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, how],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_sweep_removes_the_folders_of_dead_processes_only(tmp_path, monkeypatch):
    from ingestion.sent_files import sent_parent, sweep_orphans

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # recomputed from TMPDIR
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    live, live_src = _holder("live", env)
    dead, dead_src = _holder("die", env)
    assert dead.wait(timeout=60) == -signal.SIGKILL
    assert (dead_src / "rec.hea").exists() and (live_src / "rec.hea").exists()
    assert dead_src.parent.parent == live_src.parent.parent == sent_parent()
    assert dead_src.parent.name.startswith(f"sent-{dead.pid}-")
    assert sweep_orphans() == 1
    assert not dead_src.parent.exists() and (live_src / "rec.hea").exists()
    live.communicate("\n", timeout=60)
    assert live.returncode == 0 and not live_src.parent.exists()
    assert list(sent_parent().iterdir()) == []


def test_no_record_file_outlives_a_worker_killed_mid_record(tmp_path, monkeypatch):
    """The worker handling g1/R03 exits mid-record (twice: the batch, then the record alone):
    the ingest ends with that record rejected as "worker died" and no record file left in the
    temporary folder of the workers or the driver."""
    src = tmp_path / "src"
    for i in range(6):
        write_cinc(src / "g1", f"R{i:02d}", patient=f"P{i}")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setenv("ECGPLAT_TEST_CRASH_ON", "g1/R03")
    summary = ingest(
        "cinc2021", src, tmp_path / "s", workers=1, batch_size=3, progress=False, send_bytes=True
    )
    assert summary["records"] == 5 and summary["rejected"] == {"worker died": 1}, summary
    left = [p for p in tmp.rglob("*") if p.suffix in (".hea", ".mat")]
    assert left == [], left
