"""CODE-15% reader, PhysioNet Challenge 2025 header dialect: WFDB ``.hea`` + ``.dat`` records.

Layout: ``<src>/**/<exam id>.hea`` (the challenge's ``training_data/`` and ``holdout_data/``),
12 leads, mostly 400 Hz, 2,934 or 4,096 samples (7.3 or 10.2 s). Comments, read by key:
``# Exam ID:`` (the record id), ``# Patient ID:`` (a raw identifier: only ever pseudonymised by
the store writer), ``# Age:``, ``# Sex:`` and ``# Chagas label:`` (``True``/``False``, kept as
the raw code ``chagas:True`` / ``chagas:False``; Chagas is not one of the 26 scored classes).

The challenge's own test artefacts, and what happens to them:

- ``9190_all_data_is_zero`` (declared 800 Hz, every sample 0): rejected, "flat signal: all
  samples zero". An all-zero trace is no ECG; a store of training data must not hold it (its
  per-lead standard deviation is 0, and it would teach the encoder that silence is a heartbeat).
- ``9190_low_sample_rate`` (declared 300 Hz): its header names exam 9190's own signal file
  (``9190.dat``) at another rate, so it is exam 9190 a second time, time-stretched by 4/3.
  Rejected as a duplicate of that exam (same ``# Exam ID``, file stem not the exam id, and the
  exam's own header beside it): keeping it would put one ECG into the store twice under one
  patient, which inflates identification (gallery and probe would share a recording). A 300 or
  800 Hz record that is its own exam is conditioned like any rate (resampled to 500 Hz). (The
  artefact's own ``9190_low_sample_rate.dat`` beside it is byte-identical to ``9190.dat``.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ingestion.readers.options import ReadOptions
from ingestion.readers.recognise import refuse_other_corpus
from ingestion.readers.record import RawRecord, RecordError, comment_fields, parse_age, parse_sex
from ingestion.readers.wfdb_dir import list_records as _all_headers
from ingestion.readers.wfdb_dir import read_wfdb

SOURCE = "code15"


def check_corpus(src: Path, listing: list[str]) -> None:
    """ValueError when ``src`` holds another corpus (``ingestion.readers.recognise``)."""
    refuse_other_corpus(SOURCE, src, listing, ("code15",), require_own=True)


def list_records(src: Path) -> list[str]:
    """Relative paths (no extension) of every ``.hea`` under ``src``, sorted."""
    return _all_headers(src)


def _exam_id(fields: dict, rel: str) -> str:
    """The record id: the ``# Exam ID`` when given, else the file stem."""
    return fields.get("exam id", "").strip() or Path(rel).name


def check_not_duplicate(src: Path, rel: str, exam: str) -> None:
    """RecordError when ``rel`` is a second file of exam ``exam`` whose own header is beside it."""
    stem = Path(rel).name
    plain = exam and "/" not in exam and "\\" not in exam and exam not in (".", "..")
    if exam != stem and plain and (Path(src) / rel).with_name(f"{exam}.hea").is_file():
        raise RecordError(
            rel,
            f"duplicate of exam {exam}: same Exam ID as {exam}.hea beside it "
            "(a copy of that exam, not a recording of its own)",
        )


def check_not_flat(signal: np.ndarray, rel: str) -> None:
    """RecordError for a signal in which every channel is constant (no ECG at all)."""
    if signal.size == 0 or np.ptp(signal, axis=-1).any():
        return
    what = "all samples zero" if not signal.any() else "every lead constant"
    raise RecordError(rel, f"flat signal: {what}")


def read_record(src: Path, rel: str, opts: ReadOptions | None = None) -> RawRecord:
    """Read one CODE-15% record (``rel`` relative to ``src``, without extension)."""
    signal, fs, names, comments = read_wfdb(src, rel, opts)
    fields = comment_fields(comments)
    exam = _exam_id(fields, rel)
    check_not_duplicate(src, rel, exam)
    check_not_flat(signal, rel)
    chagas = fields.get("chagas label", "").strip()
    return RawRecord(
        source=SOURCE,
        record_id=exam,
        path=rel,
        signal=signal,
        fs=fs,
        lead_names=names,
        patient_id=fields.get("patient id") or None,
        codes=[f"chagas:{chagas}"] if chagas else [],
        age=parse_age(fields.get("age")),
        sex=parse_sex(fields.get("sex")),
        extra={"chagas": chagas},
    )
