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
The size checks come before any sample is read, like a WFDB header's: an ``.npz`` member's
uncompressed size in the zip directory, then the ``.npy`` header (shape and dtype: numeric,
2-D, the duration within ``--max-duration`` and exactly the bytes the file or member holds), so
a sparse file or a zip bomb declaring hours of samples costs no more memory than a good record.
"""

from __future__ import annotations

import csv
import math
import os
import re
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ecgplat.labels import ABBREVIATION_TO_SNOMED, codes_to_multihot
from ecgplat.leads import canonical_lead
from ingestion.readers.options import ReadOptions, check_length, inside_src
from ingestion.readers.recognise import refuse_other_corpus
from ingestion.readers.record import RawRecord, RecordError
from ingestion.readers.units import array_unit

SOURCE = "numpy"
OPTIONS = ("fs", "leads", "units", "patients")  # the ReadOptions reader fields it takes
SUFFIXES = (".npy", ".npz")


def _root(src: Path) -> Path:
    src = Path(src)
    return src if src.is_dir() else src.parent


def check_corpus(src: Path, listing: list[str]) -> None:
    """ValueError when ``src`` holds another corpus (``ingestion.readers.recognise``)."""
    refuse_other_corpus(SOURCE, src, listing, ("numpy",), require_own=True)


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
    # utf-8-sig: a byte-order mark (an Excel export) is not part of the first column's name
    with open(path, newline="", encoding="utf-8-sig") as f:
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
    ValueError for a missing file, one that is not UTF-8 or lacks a record_id column."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: patients file not found")
    try:
        return _patients(str(p.resolve()), p.stat().st_mtime_ns)
    except UnicodeDecodeError:  # its text would quote the bytes (a patient id, maybe)
        raise ValueError(f"{p}: patients file is not UTF-8 text (save it as UTF-8)") from None


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


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_MAX_NPY_HEADER = 1 << 16  # numpy writes a few hundred bytes; read_array_header's own cap is 10 k
_MAX_ITEMSIZE = 16  # the widest numeric dtype (long double)
_CHUNK = 1 << 20


def lead_axis(shape: tuple[int, ...], n_leads: int, rel: str) -> int:
    """The axis of a 2-D ``shape`` holding the leads (0 when both do); RecordError otherwise."""
    if len(shape) != 2:
        raise RecordError(
            rel, f"bad shape {shape}: expected 2-D (leads, samples) or (samples, leads)"
        )
    if n_leads in shape:
        return shape.index(n_leads)
    raise RecordError(
        rel, f"wrong lead count: shape {shape} has no axis of {n_leads} (the --leads list)"
    )


def orient(arr: np.ndarray, n_leads: int, rel: str) -> np.ndarray:
    """(leads, samples) view of a 2-D array, by which axis has the lead count."""
    return arr.T if lead_axis(arr.shape, n_leads, rel) else arr


@dataclass(frozen=True)
class Limits:
    """What a record may hold: its lead count, its rate and the ingest's bounds."""

    n_leads: int
    rate: float
    opts: ReadOptions

    def max_bytes(self) -> int:
        """The most bytes an array within the bounds takes (at the widest numeric dtype)."""
        samples = math.floor(self.opts.max_seconds * self.rate)
        return _MAX_NPY_HEADER + self.n_leads * samples * _MAX_ITEMSIZE


def _npy_header(fp) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) from the header of the .npy stream ``fp``; ValueError when
    it is not one."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    raise ValueError(f"unsupported .npy version {version}")


def _check_header(rel: str, header, data_bytes: int, limits: Limits) -> None:
    """The checks of an array's header, before any sample is read: numeric, 2-D, an axis of
    the lead count, the duration within bounds, and exactly the bytes its shape needs."""
    shape, _, dtype = header
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise RecordError(rel, f"not a numeric array (dtype {dtype})")
    n_samples = shape[1 - lead_axis(shape, limits.n_leads, rel)]
    check_length(rel, limits.rate, n_samples, limits.opts)
    expected = math.prod(shape) * dtype.itemsize
    if data_bytes != expected:
        raise RecordError(
            rel,
            f"array data holds {data_bytes} bytes but its header implies {expected} "
            f"(shape {shape}, dtype {dtype}): truncated or extra data",
        )


def _read_values(fp, header) -> np.ndarray:
    """The array of ``header`` from the stream ``fp`` (positioned after the header)."""
    shape, fortran, dtype = header
    arr = np.empty(math.prod(shape), dtype=dtype)
    buf = arr.view(np.uint8).data  # the array's bytes, filled in place
    pos = 0
    while pos < len(buf):
        n = fp.readinto(buf[pos : pos + _CHUNK])
        if not n:
            raise EOFError("array data ends early")
        pos += n
    return arr.reshape(shape, order="F" if fortran else "C")


def _npz_member(zf: zipfile.ZipFile, rel: str, limits: Limits) -> zipfile.ZipInfo:
    """The member holding the record (``signal``, or the only one), checked by its size in the
    zip directory before it is opened."""
    members = {i.filename.removesuffix(".npy"): i for i in zf.infolist()}
    if "signal" not in members and len(members) != 1:
        raise RecordError(rel, f"npz holds {len(members)} arrays: keep one, or name it 'signal'")
    info = members["signal"] if "signal" in members else next(iter(members.values()))
    if info.file_size > limits.max_bytes():
        raise RecordError(
            rel,
            f"npz member holds {info.file_size} bytes uncompressed, more than "
            f"{limits.opts.max_seconds:g} s of {limits.n_leads} leads at {limits.rate:g} Hz "
            "can take (--max-duration)",
        )
    return info


def _load_checked(file: Path, rel: str, limits: Limits) -> np.ndarray:
    with open(file, "rb") as f:
        magic = f.read(len(_NPY_MAGIC))
        f.seek(0)
        if magic == _NPY_MAGIC:
            header = _npy_header(f)
            _check_header(rel, header, os.fstat(f.fileno()).st_size - f.tell(), limits)
            return _read_values(f, header)
        if not magic.startswith(_ZIP_MAGIC):
            raise ValueError("neither .npy nor .npz")
        with zipfile.ZipFile(f) as zf:
            info = _npz_member(zf, rel, limits)
            with zf.open(info) as member:
                header = _npy_header(member)
                _check_header(rel, header, info.file_size - member.tell(), limits)
                return _read_values(member, header)


def load_array(file: Path, rel: str, limits: Limits) -> np.ndarray:
    """The file's one array (an ``.npy``, or an ``.npz``'s only array or its ``signal``),
    checked against ``limits`` from the zip directory and the .npy header before any sample is
    read; RecordError otherwise."""
    try:
        return _load_checked(file, rel, limits)
    except RecordError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy/zipfile raise many types on damaged files
        raise RecordError(rel, f"not a readable .npy/.npz array ({type(e).__name__})") from None


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
    x = orient(load_array(file, rel, Limits(len(names), rate, opts)), len(names), rel)
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
