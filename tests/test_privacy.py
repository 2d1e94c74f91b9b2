"""No raw identifier in anything a pipeline run writes: store files (records, rejects), CLI
stdout/stderr (human and JSON summaries, Dask worker logs), ``info``, and exception text."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hostile_files import edit_header, write_cinc, write_ptbxl, write_wfdb

from ecgplat.store import open_store
from ingestion.readers import ptbxl
from ingestion.readers.record import RecordError
from ingestion.worker import process_batch

ROOT = Path(__file__).parents[1]
RAW = [
    "data_101",
    "_101_",
    "data_202",
    "_202_",
    "HOSP-4242-ZZ",
    "HOSP-5151-QQ",
    "HOSP-6161-RR",
    "HOSP-7373-XX",
    "PAT-9191",
]


def _corpora(tmp_path: Path) -> dict[str, Path]:
    cpsc = tmp_path / "cpsc"
    for name in ("data_101_1", "data_101_9", "data_202_3", "data_303_5"):
        write_wfdb(cpsc, name, n_sig=2, fs=200, names=["I", "II"], seconds=10)
    data = (cpsc / "data_101_9.dat").read_bytes()
    (cpsc / "data_101_9.dat").write_bytes(data[: len(data) // 2])  # truncated
    edit_header(cpsc / "data_202_3", lambda ls: [ls[0].replace(" 200 ", " -200 "), *ls[1:]])
    (cpsc / "data_303_5.dat").unlink()  # missing signal file
    rows = [
        {"filename_hr": "records500/00000/00001_hr", "patient_id": "HOSP-4242-ZZ"},
        {"filename_hr": "records500/00000/00002_hr", "sex": "HOSP-5151-QQ"},
        {"filename_hr": "records500/00000/00003_hr", "strat_fold": "HOSP-6161-RR"},
        {
            "filename_hr": "records500/00000/00004_hr",
            "patient_id": "HOSP-7373-XX",
            "_no_file": True,
        },
        {"filename_hr": "records500/00000/00005_hr"},
    ]
    write_ptbxl(tmp_path / "ptbxl", rows)
    cinc = tmp_path / "cinc"
    write_cinc(cinc, "PAT-9191_a", patient="PAT-9191")
    write_cinc(cinc, "PAT-9191_b", patient="PAT-9191")
    (cinc / "PAT-9191_b.mat").unlink()
    return {"cpsc2021": cpsc, "ptbxl": tmp_path / "ptbxl", "cinc2021": cinc}


def _leaks(text: str) -> list[str]:
    return [raw for raw in RAW if raw in text]


def test_no_raw_identifier_in_any_output(tmp_path):
    store = tmp_path / "store"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    commands = [
        ["ingest", corpus, str(src), "--store", str(store), "--batch-size", "2", "--no-progress",
         *extra]
        for corpus, src in _corpora(tmp_path).items()
        for extra in (["--workers", "0", "--json"], ["--workers", "1"])  # rerun: skips all
    ]  # fmt: skip
    # every command as `python -m ecgplat` runs it, in one process (tests/cli_batch.py)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cli_batch.py"),
         json.dumps([*commands, ["info", str(store)]])],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("=== ecgplat command") == len(commands) + 1
    outputs = [proc.stdout, proc.stderr]
    s = open_store(store)
    assert s.n_records == 4 and len(s.rejects) == 7
    # the rejects stay useful: the path names the file, with the patient part pseudonymised
    paths = sorted(s.rejects["path"])
    assert any(p.startswith("data_p-") and p.endswith("_9") for p in paths), paths
    assert "records500/00000/00004_hr" in paths
    reasons = dict(zip(s.rejects["path"], s.rejects["reason"], strict=True))
    assert reasons["records500/00000/00002_hr"] == "sex in ptbxl_database.csv is not an integer"
    tables = [s.records.astype(str).to_csv(), s.rejects.astype(str).to_csv()]
    assert not _leaks("\n".join(outputs + tables)), _leaks("\n".join(outputs + tables))
    for f in store.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert not [r for r in RAW if r.encode() in data], f


def test_exception_text_and_worker_rejects_carry_no_field_values(tmp_path):
    src = _corpora(tmp_path)["ptbxl"]
    for rel in ("records500/00000/00002_hr", "records500/00000/00003_hr"):
        with pytest.raises(RecordError) as err:
            ptbxl.read_record(src, rel)
        assert not _leaks(str(err.value)) and "ptbxl_database.csv" in str(err.value)
    rec = ptbxl.read_record(src, "records500/00000/00001_hr")
    assert rec.patient_id == "HOSP-4242-ZZ" and "HOSP" not in repr(rec)
    batch = process_batch(
        "cpsc2021", str(tmp_path / "cpsc"), ["data_101_9", "data_202_3"], 0, b"k" * 32
    )
    assert len(batch.rejects) == 2 and not _leaks(repr(batch.rejects))
