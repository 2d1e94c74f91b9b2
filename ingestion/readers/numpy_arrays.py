"""Bring-your-own arrays: ``.npy`` / ``.npz`` files of ECG samples, one record per file.

``PATH`` is one file or a folder (searched recursively). Each file holds one 2-D numeric array:
an ``.npy``, or an ``.npz`` with a single array or one named ``signal``. Its layout is
``(leads, samples)``; a ``(samples, leads)`` array is recognised when exactly one axis has the
length of the ``--leads`` list and is transposed (a square array is taken as (leads, samples)).
The sampling rate (``fs``), the lead names (``leads``, in the array's order, any case) and the
unit of the values (``units``: mV, the default; uV; or z for z-scored data) hold for every file;
they come with the ingest's ``ingestion.readers.options.ReadOptions``, like its rate range, maximum
duration and path policy (every file must lie inside ``PATH``, or be ``PATH`` itself).
The record id is the file's path below ``PATH`` without the extension (``sub/rec1``).

An optional CSV (``patients``) has a ``record_id`` column and optionally ``patient_id`` and
``labels`` (SNOMED codes or the 26 class abbreviations such as ``AF`` or ``LBBB``, separated by
``;`` or spaces). Records not in it are their own patient with no labels. Patient ids are raw
identifiers and are only pseudonymised by the store writer.

Each bad file is rejected with a one-line reason: unreadable or not an array, not 2-D, not
numeric, no axis matching the lead count, NaN or infinite values, an unknown label in the CSV.
"""

from __future__ import annotations

import csv
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from ecgplat.labels import ABBREVIATION_TO_SNOMED, codes_to_multihot
from ecgplat.leads import canonical_lead
from ingestion.readers.options import ReadOptions, check_length, inside_src
from ingestion.readers.record import RawRecord, RecordError
from ingestion.readers.units import array_unit

SOURCE = "numpy"
OPTIONS = ("fs", "leads", "units", "patients")  # the ReadOptions reader fields it takes
SUFFIXES = (".npy", ".npz")


def _root(src: Path) -> Path:
    src = Path(src)
    return src if src.is_dir() else src.parent


def list_records(src: Path) -> list[str]:
    """Paths (with extension) of the array files: ``src`` itself, or every one below it."""
    src = Path(src)
    if src.is_file():
        return [src.name] if src.suffix.lower() in SUFFIXES else []
    return sorted(
        p.relative_to(src).as_posix()
        for p in src.rglob("*")
        if p.suffix.lower() in SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def parse_lead_names(spec: str | list[str]) -> list[str]:
    """The ``--leads`` list as names; ValueError for an empty list, an unknown or repeated lead."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec)]
    if not names or not all(names):
        raise ValueError(f"--leads {spec!r}: give the array's lead names, e.g. I,II,III")
    canon = [canonical_lead(n) for n in names]
    bad = [n for n, c in zip(names, canon, strict=True) if c is None]
    if bad:
        raise ValueError(f"--leads: unknown lead name(s) {', '.join(bad)} (use I..V6, aVR..aVF)")
    if len(set(canon)) != len(canon):
        raise ValueError(f"--leads {spec!r}: a lead is named twice")
    return names


def check_rate(fs) -> float:
    """The ``--fs`` value as a positive finite float; ValueError otherwise (or when missing)."""
    if fs is None:
        raise ValueError("missing sampling rate: pass --fs HZ")
    try:
        value = float(fs)
    except (TypeError, ValueError):
        raise ValueError(f"--fs {fs!r} is not a number") from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"--fs {fs!r} must be a positive number of Hz")
    return value


def label_codes(text: str) -> list[str]:
    """SNOMED codes of a ``labels`` cell; ValueError naming an unknown label."""
    out = []
    for token in (t for t in re.split(r"[;\s]+", str(text or "")) if t):
        if token.isdigit():
            out.append(token)
        elif token.upper() in _ABBREV:
            out.append(_ABBREV[token.upper()])
        else:
            raise ValueError(f"unknown label {token!r} (not a SNOMED code or a class abbreviation)")
    return out


_ABBREV = {k.upper(): v for k, v in ABBREVIATION_TO_SNOMED.items()}


@lru_cache(maxsize=4)
def _patients(path: str, mtime_ns: int) -> dict[str, tuple[str | None, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "record_id" not in columns:
            raise ValueError(f"{path}: needs a record_id column (has: {', '.join(columns)})")
        table = {}
        for row in reader:
            row = {str(k).strip(): (v or "").strip() for k, v in row.items() if k is not None}
            rid = row.get("record_id", "")
            if not rid:
                continue
            if rid in table:
                raise ValueError(f"{path}: record_id {rid!r} is listed twice")
            table[rid] = (row.get("patient_id") or None, row.get("labels", ""))
    return table


def read_patients(path: str | Path) -> dict[str, tuple[str | None, str]]:
    """record_id -> (raw patient id or None, labels cell) of the CSV (cached per file version);
    ValueError for a missing file or a missing record_id column."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: patients file not found")
    return _patients(str(p.resolve()), p.stat().st_mtime_ns)


def check_options(opts: ReadOptions) -> None:
    """ValueError (naming the option) for a missing or bad ``--fs``/``--leads``, an unknown
    ``--units``, or a ``--patients`` file that is missing or has no record_id column."""
    check_rate(opts.fs)
    if opts.leads is None:
        raise ValueError("missing lead names: pass --leads I,II,...")
    parse_lead_names(opts.leads)
    array_unit(opts.units)
    if opts.patients is not None:
        read_patients(opts.patients)


def load_array(file: Path, rel: str) -> np.ndarray:
    """The file's one array (an ``.npz``'s only array or its ``signal``); RecordError otherwise."""
    try:
        data = np.load(file, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            return np.asarray(data)
        with data:
            keys = list(data.keys())
            if "signal" not in keys and len(keys) != 1:
                raise RecordError(
                    rel, f"npz holds {len(keys)} arrays: keep one, or name it 'signal'"
                )
            return data["signal" if "signal" in keys else keys[0]]
    except RecordError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy/zipfile raise many types on damaged files
        raise RecordError(rel, f"not a readable .npy/.npz array ({type(e).__name__})") from None


def orient(arr: np.ndarray, n_leads: int, rel: str) -> np.ndarray:
    """(leads, samples) view of a 2-D array, by which axis has the lead count."""
    if arr.ndim != 2:
        raise RecordError(
            rel, f"bad shape {arr.shape}: expected 2-D (leads, samples) or (samples, leads)"
        )
    if arr.shape[0] == n_leads:
        return arr
    if arr.shape[1] == n_leads:
        return arr.T
    raise RecordError(
        rel, f"wrong lead count: shape {arr.shape} has no axis of {n_leads} (the --leads list)"
    )


def read_record(src: Path, rel: str, opts: ReadOptions | None = None) -> RawRecord:
    """Read one array file (``rel`` below ``src``) with the rate, leads, units and CSV of
    ``opts``."""
    opts = opts or ReadOptions()
    try:
        rate = check_rate(opts.fs)
        names = parse_lead_names(opts.leads or "")
        unit, factor = array_unit(opts.units)
        table = read_patients(opts.patients) if opts.patients else {}
    except ValueError as e:
        raise RecordError(rel, str(e)) from None
    check_length(rel, rate, 0, opts)
    file = inside_src(_root(src), rel, rel, opts)
    if not file.is_file():
        raise RecordError(rel, "file not found")
    arr = load_array(file, rel)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise RecordError(rel, f"not a numeric array (dtype {arr.dtype})")
    x = orient(arr, len(names), rel)
    check_length(rel, rate, x.shape[1], opts)
    if not np.isfinite(x).all():
        raise RecordError(rel, "signal contains NaN or infinite values")
    record_id = rel.rsplit(".", 1)[0]
    patient, cell = table.get(record_id, (None, ""))
    try:
        codes = label_codes(cell)
    except ValueError as e:
        raise RecordError(rel, f"patients file: {e}") from None
    return RawRecord(
        source=SOURCE,
        record_id=record_id,
        path=rel,
        signal=(x.astype(np.float64) * factor).astype(np.float32),
        fs=rate,
        lead_names=names,
        patient_id=patient,
        codes=codes,
        labels=codes_to_multihot(codes),
        units=unit,
    )
