"""Small input checks: an s3:// store without s3fs, patients CSVs from spreadsheets, the length
printed for a record just under 5 s."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ecgplat.leads import LEADS
from ingestion.conditioning import condition
from ingestion.readers.numpy_arrays import read_patients
from ingestion.readers.record import RawRecord, RecordError

REPO = Path(__file__).parents[1]


def test_s3_store_without_s3fs_says_what_to_install():
    """s3fs may be installed here: a None entry in sys.modules makes its import fail."""
    code = (
        "import sys; sys.modules['s3fs'] = None\n"
        "from ecgplat.cli import app\n"
        "app(['info', 's3://bucket/store'], prog_name='ecgplat')\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ECGPLAT_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: s3://bucket/store: install s3fs to read s3:// stores\n"


def test_patients_csv_with_a_byte_order_mark_is_read(tmp_path):
    csv = tmp_path / "patients.csv"
    csv.write_bytes("record_id,patient_id\nrec_a,P1\n".encode("utf-8-sig"))  # Excel's export
    assert read_patients(csv) == {"rec_a": ("P1", "")}


def test_patients_csv_in_latin1_is_refused_naming_the_file(tmp_path):
    csv = tmp_path / "export.csv"
    csv.write_bytes("record_id,patient_id\nrec_a,Müller\n".encode("latin-1"))
    with pytest.raises(ValueError) as info:
        read_patients(csv)
    assert str(info.value) == f"{csv}: patients file is not UTF-8 text (save it as UTF-8)"
    assert "Müller" not in str(info.value) and "\\xfc" not in str(info.value)


@pytest.mark.parametrize("n, shown", [(2499, "4.998"), (2000, "4.00")])
def test_too_short_prints_a_length_below_the_minimum(n, shown):
    """4.998 s was reported as "too short: 5.00 s < 5 s"."""
    rec = RawRecord(
        source="numpy",
        record_id="r",
        path="r",
        signal=np.ones((12, n), np.float32),
        fs=500.0,
        lead_names=list(LEADS),
    )
    with pytest.raises(RecordError, match=f"too short: {shown} s < 5 s minimum"):
        condition(rec)
