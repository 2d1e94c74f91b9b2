"""PTB-XL reader: ``ptbxl_database.csv`` metadata + the 500 Hz WFDB records (``filename_hr``).

The source root is the folder holding ``ptbxl_database.csv``; records are the ``filename_hr``
paths (``records500/00000/00013_hr``), record id = the zero-padded ecg id (``00013``). Metadata:
``patient_id`` (a float in the csv, returned as the string of its integer), ``age`` (PTB-XL
writes 300 for patients older than 89; returned as 90), ``sex`` (0 = male, 1 = female),
``scp_codes`` (a Python dict literal: statement -> likelihood; all listed statements are kept as
the raw codes), ``heart_axis`` and ``strat_fold`` (kept in ``extra``). Labels map SCP statements
and the heart axis to the scored classes with ``ecgplat.labels.scp_to_snomed``.
"""

from __future__ import annotations

import ast
import math
from functools import lru_cache
from pathlib import Path

from ecgplat.labels import codes_to_multihot, scp_to_snomed
from ingestion.readers.options import ReadOptions
from ingestion.readers.recognise import refuse_other_corpus
from ingestion.readers.record import RawRecord, RecordError, parse_age
from ingestion.readers.wfdb_dir import read_wfdb

SOURCE = "ptbxl"
DATABASE = "ptbxl_database.csv"


@lru_cache(maxsize=4)
def _database(csv_path: str, mtime_ns: int):
    import pandas as pd

    try:
        db = pd.read_csv(csv_path)
    except Exception:  # noqa: BLE001 - any parse failure is reported as a bad database
        # no exception text: it can quote cell values (patient ids)
        raise RecordError(csv_path, "cannot read the PTB-XL database (not a csv table)") from None
    missing = {"ecg_id", "patient_id", "filename_hr", "scp_codes"} - set(db.columns)
    if missing:
        raise RecordError(csv_path, f"missing columns {sorted(missing)}")
    db = db.set_index("filename_hr", drop=False)
    # one dict per listed record (what ``_row`` returns): a pandas ``.loc`` per record costs
    # more than reading its signal; records listed more than once map to None
    dup = db.index.duplicated(keep=False)
    rows = dict(zip(db.index[~dup], db[~dup].to_dict("records"), strict=True))
    rows.update(dict.fromkeys(db.index[dup]))
    return db, rows


def database(src: Path):
    """The metadata table, indexed by ``filename_hr`` (cached per file version)."""
    path = Path(src) / DATABASE
    if not path.exists():
        raise RecordError(str(path), f"not a PTB-XL root: {DATABASE} not found")
    return _database(str(path), path.stat().st_mtime_ns)[0]


def _rows(src: Path) -> dict:
    path = Path(src) / DATABASE
    if not path.exists():
        raise RecordError(str(path), f"not a PTB-XL root: {DATABASE} not found")
    return _database(str(path), path.stat().st_mtime_ns)[1]


def check_corpus(src: Path, listing: list[str]) -> None:
    """ValueError when ``src`` holds another corpus (``ingestion.readers.recognise``)."""
    refuse_other_corpus(SOURCE, src, listing, ("ptbxl",), require_own=True)


def list_records(src: Path) -> list[str]:
    """The ``filename_hr`` paths listed in ``ptbxl_database.csv``, sorted."""
    return sorted(str(f) for f in database(src)["filename_hr"].dropna())


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _patient(value) -> str | None:
    """The raw patient id as a string: ``15709.0`` -> ``"15709"``; a non-numeric id is kept as
    written (it is only ever pseudonymised)."""
    if _is_missing(value) or str(value).strip() == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value).strip()
    if math.isfinite(number) and number == int(number):
        return str(int(number))
    return str(value).strip()


def _int_field(row, name: str, rel: str, required: bool = False) -> int | None:
    """An integer column; RecordError naming the column (never its value) if it is not one."""
    value = row.get(name)
    if _is_missing(value):
        if required:
            raise RecordError(rel, f"{name} is missing in {DATABASE}")
        return None
    try:
        number = float(value)
        if not number.is_integer():
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise RecordError(rel, f"{name} in {DATABASE} is not an integer") from None
    return int(number)


def _row(src: Path, rel: str):
    rows = _rows(src)
    if rel not in rows:
        raise RecordError(rel, f"not listed in {DATABASE}")
    row = rows[rel]
    if row is None:
        raise RecordError(rel, f"listed more than once in {DATABASE}")
    return row


def patient_hint(src: Path, rel: str, opts: ReadOptions | None = None) -> str | None:
    """The raw patient id of a listed record (for redacting it from a reject), or None."""
    try:
        return _patient(_row(src, rel).get("patient_id"))
    except Exception:  # noqa: BLE001 - a hint only
        return None


def read_record(src: Path, rel: str, opts: ReadOptions | None = None) -> RawRecord:
    """Read one PTB-XL record by its ``filename_hr`` path."""
    row = _row(src, rel)
    ecg_id = _int_field(row, "ecg_id", rel, required=True)
    try:
        scp = ast.literal_eval(row["scp_codes"]) if not _is_missing(row["scp_codes"]) else {}
        if not isinstance(scp, dict):
            raise TypeError("not a dict")
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise RecordError(rel, "unparsable scp_codes (expected a dict literal)") from None
    signal, fs, names, _ = read_wfdb(src, rel, opts)
    axis = row.get("heart_axis")
    axis = "" if _is_missing(axis) else str(axis)
    age = parse_age(row.get("age"))
    if age >= 300:  # PTB-XL's marker for "older than 89"
        age = 90.0
    sex_code = _int_field(row, "sex", rel)
    sex = {0: "M", 1: "F"}.get(sex_code, "") if sex_code is not None else ""
    extra = {"ecg_id": ecg_id, "heart_axis": axis}
    fold = _int_field(row, "strat_fold", rel)
    if fold is not None:
        extra["strat_fold"] = fold
    codes = [str(c) for c in scp]
    return RawRecord(
        source=SOURCE,
        record_id=f"{ecg_id:05d}",
        path=rel,
        signal=signal,
        fs=fs,
        lead_names=names,
        patient_id=_patient(row.get("patient_id")),
        codes=codes,
        labels=codes_to_multihot(scp_to_snomed(scp, axis)),
        age=age,
        sex=sex,
        extra=extra,
    )
