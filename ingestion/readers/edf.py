"""EDF and EDF+ files (continuous EDF+C, discontinuous EDF+D): the ECG channels of one file as one
record, in millivolts at the file's own rate.

A file is recognised by its header (version ``"0       "``, a header size of 256 bytes per
signal plus one), whatever its extension. Before any sample is read, the header is parsed here
and the file's size must be exactly the header plus the declared number of data records (a
count of -1, or one that disagrees with the size, is refused). The samples and their physical
scaling (physical and digital minimum/maximum, physical dimension uV/mV/V) are read by edfio
(pyedflib refuses EDF+D files outright).

ECG channels are picked by label: a lead name alone (``II``, ``V1``, ``aVR``, ``MLII``) or after
``ECG``/``EKG`` (``ECG I``, ``EKG-V2``, ``ECG lead II``) gives that lead; a label that is only
``ECG``/``EKG`` (or ``ECG1``, ``EKG L``...) is an ECG channel without a lead. A lone unnamed ECG
channel, in a file with no named lead, is taken as lead II: the single-channel ECG of
polysomnography is placed as a modified lead II (AASM scoring manual). Unnamed channels next to
named ones are dropped; two or more unnamed ones alone are refused (no way to tell the leads
apart). A channel counts only with a voltage dimension. The ECG channels must share one rate.

EDF+D: the onset of each data record is the time-keeping annotation (the first TAL of the first
``EDF Annotations`` signal). Records whose onset is the previous record's end (within half a
sample) form a contiguous run; the longest run is read (the earliest of equal ones) and the
rest is dropped, so no gap is ever spliced over. Onsets that go back in time are refused.

Allow-list (``ingestion.readers.clinical``): only the EDF+ local patient identification's first
two subfields, the patient code (the raw identifier, pseudonymised by the store writer; ``X`` is
none) and sex, are kept, plus the age in whole years (capped at 90) from its birth date and the
recording's start date (EDF+ ``Startdate`` subfield, else the header's start date), the dates
then dropped. The patient name, the birth date itself, the local recording identification
(technician, equipment, admission code) and the start date and time are never kept. A plain EDF
(not EDF+) patient field is free text and is not read at all, unless it follows the EDF+ layout
strictly (sex ``M``/``F``/``X`` and a ``dd-MMM-yyyy`` birth date or ``X``, as edfio writes
files without annotations).
"""

from __future__ import annotations

import datetime as dt
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecgplat.leads import canonical_lead
from ingestion.readers.clinical import age_from_dates, file_record, list_files, source_root
from ingestion.readers.options import DEFAULT_OPTIONS, ReadOptions, check_length, inside_src
from ingestion.readers.record import RawRecord, RecordError, unit_scale_to_mv

SOURCE = "edf"
VERSION = b"0       "
ANNOTATIONS = "EDF Annotations"
# the per-signal header fields, in file order, and their widths
_SIGNAL_FIELDS = (
    ("label", 16),
    ("transducer", 80),
    ("dimension", 8),
    ("physical_min", 8),
    ("physical_max", 8),
    ("digital_min", 8),
    ("digital_max", 8),
    ("prefilter", 80),
    ("samples", 8),
    ("reserved", 32),
)
_ECG_LABEL = re.compile(r"^(?:ecg|ekg)[\s_:.\-]*(?:lead[\s_:.\-]*)?(.*)$", re.IGNORECASE)
_TAL_ONSET = re.compile(rb"^([+-]\d+(?:\.\d*)?)[\x14\x15]")
_MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]


def looks_like_edf(head: bytes, size: int) -> bool:
    """Whether a file starting with ``head`` (256 bytes or more) has an EDF header."""
    if len(head) < 256 or head[:8] != VERSION:
        return False
    try:
        header_bytes, signals = int(head[184:192]), int(head[252:256])
    except ValueError:
        return False
    return signals > 0 and header_bytes == 256 * (signals + 1)


def list_records(src: Path) -> list[str]:
    """Paths (with extension, if any) of the EDF files: ``src`` itself, or every one below it."""
    return list_files(src, looks_like_edf, 256)


@dataclass(frozen=True)
class Header:
    """The header fields this reader uses (identifying fields are read by ``patient`` only)."""

    plus: str  # "EDF+C", "EDF+D" or "" (plain EDF)
    patient: str  # the local patient identification, raw: only ``patient`` reads it
    recording: str  # the local recording identification, raw: only ``_start_date`` reads it
    startdate: str  # dd.mm.yy
    n_records: int
    record_seconds: float
    signals: dict[str, list[str]]  # field name -> one value per signal

    @property
    def samples(self) -> list[int]:
        return [int(v) for v in self.signals["samples"]]

    @property
    def record_bytes(self) -> int:
        return 2 * sum(self.samples)

    @property
    def header_bytes(self) -> int:
        return 256 * (len(self.signals["label"]) + 1)


def _number(rel: str, raw: bytes, what: str, kind=int):
    try:
        return kind(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise RecordError(rel, f"EDF header field '{what}' is not a number") from None


def read_header(file: Path, rel: str) -> Header:
    """The header of the EDF file ``file``, after checking that the file's size is the header
    plus the declared data records (``RecordError`` otherwise); no sample is read."""
    with open(file, "rb") as f:
        head = f.read(256)
        if len(head) < 256:
            raise RecordError(rel, "truncated: shorter than an EDF header")
        if head[:8] != VERSION:
            raise RecordError(rel, "not an EDF file (version field; BDF is not supported)")
        ns = _number(rel, head[252:256], "number of signals")
        body = f.read(256 * ns) if ns > 0 else b""
        size = f.seek(0, 2)
    if ns < 1 or _number(rel, head[184:192], "header bytes") != 256 * (ns + 1):
        raise RecordError(rel, "EDF header size disagrees with its number of signals")
    if len(body) < 256 * ns:
        raise RecordError(rel, "truncated: the EDF signal headers are cut short")
    signals, pos = {}, 0
    for name, width in _SIGNAL_FIELDS:
        raw = [body[pos + i * width : pos + (i + 1) * width] for i in range(ns)]
        signals[name] = [v.decode("latin-1").strip() for v in raw]
        pos += ns * width
    text = head[8:184].decode("latin-1")
    header = Header(
        plus=head[192:236].decode("latin-1").strip()[:5],
        patient=text[:80],
        recording=text[80:160],
        startdate=text[160:168],
        n_records=_number(rel, head[236:244], "number of data records"),
        record_seconds=_number(rel, head[244:252], "data record duration", float),
        signals=signals,
    )
    for value in signals["samples"]:
        _number(rel, value.encode(), "samples per data record")
    _check_size(rel, header, size)
    return header


def _check_size(rel: str, header: Header, size: int) -> None:
    if header.n_records < 1:
        raise RecordError(rel, "EDF header gives no data-record count (-1 or 0)")
    if not header.record_seconds > 0 or min(header.samples) < 0:
        raise RecordError(rel, "EDF header gives no positive data-record duration")
    expected = header.header_bytes + header.n_records * header.record_bytes
    if size < expected:
        raise RecordError(
            rel,
            f"truncated: header declares {header.n_records} data records ({expected} bytes), "
            f"the file has {size}",
        )
    if size > expected:
        raise RecordError(
            rel,
            f"file size {size} disagrees with the header's {header.n_records} data records "
            f"({expected} bytes)",
        )


# --- the allow-listed patient fields ----------------------------------------------------------


def _date(text: str) -> dt.date | None:
    """An EDF+ date ``dd-MMM-yyyy`` (None when ``X`` or malformed)."""
    parts = text.split("-")
    if len(parts) != 3 or parts[1].upper() not in _MONTHS:
        return None
    try:
        return dt.date(int(parts[2]), _MONTHS.index(parts[1].upper()) + 1, int(parts[0]))
    except ValueError:
        return None


def _start_date(header: Header) -> dt.date | None:
    """The recording's start date: EDF+ ``Startdate dd-MMM-yyyy``, else the header's
    ``dd.mm.yy`` (years 85-99 are 19xx, 00-84 20xx)."""
    fields = header.recording.split()
    if len(fields) > 1 and fields[0] == "Startdate":
        date = _date(fields[1])
        if date is not None:
            return date
    try:
        day, month, year = (int(v) for v in header.startdate.split("."))
        return dt.date(year + (1900 if year >= 85 else 2000), month, day)
    except ValueError:
        return None


def _plus_patient(header: Header) -> list[str] | None:
    """The subfields of an EDF+ local patient identification (``code sex birthdate name``...):
    in an EDF+ file, or in a plain EDF one whose field follows that layout strictly (sex M, F
    or X and a birth date or X, as edfio writes); None for free text."""
    fields = header.patient.split()
    if header.plus.startswith("EDF+"):
        return fields
    strict = (
        len(fields) >= 4
        and fields[1] in ("M", "F", "X")
        and (fields[2] == "X" or _date(fields[2]) is not None)
    )
    return fields if strict else None


def patient(header: Header) -> tuple[str | None, str, float]:
    """(raw patient code or None, sex "M"/"F"/"", age in whole capped years or NaN) from the
    EDF+ local patient identification; nothing from a free-text one (``_plus_patient``)."""
    fields = _plus_patient(header)
    if fields is None:
        return None, "", float("nan")
    code = fields[0] if fields and fields[0] != "X" else None
    sex = fields[1] if len(fields) > 1 and fields[1] in ("M", "F") else ""
    birth = _date(fields[2]) if len(fields) > 2 else None
    return code, sex, age_from_dates(birth, _start_date(header))


def patient_hint(src: Path, rel: str, opts: ReadOptions | None = None) -> str | None:
    """The raw patient code of an EDF+ file whose header reads; None otherwise."""
    try:
        file = inside_src(source_root(src), rel, rel, opts)
        return patient(read_header(file, rel))[0]
    except (RecordError, OSError):
        return None


# --- channels and data-record runs ------------------------------------------------------------


def ecg_lead(label: str) -> tuple[bool, str | None]:
    """(whether the label names an ECG channel, its canonical lead or None)."""
    lead = canonical_lead(label)
    if lead is not None:
        return True, lead
    match = _ECG_LABEL.match(label.strip())
    if match is None:
        return False, None
    return True, canonical_lead(match.group(1))


def ecg_channels(rel: str, header: Header) -> list[tuple[int, str, float]]:
    """(signal index, canonical lead, factor to mV) of the ECG channels to read (rules of the
    module docstring); ``RecordError`` when there is none or the leads cannot be told apart."""
    named: list[tuple[int, str, float]] = []
    unnamed: list[tuple[int, str, float]] = []
    for i, (label, dim) in enumerate(
        zip(header.signals["label"], header.signals["dimension"], strict=True)
    ):
        is_ecg, lead = ecg_lead(label)
        scale = unit_scale_to_mv(dim) if dim else None
        if is_ecg and scale is not None:
            (named if lead else unnamed).append((i, lead or "II", scale))
    if named:
        return named
    if len(unnamed) == 1:
        return unnamed
    if unnamed:
        raise RecordError(rel, f"{len(unnamed)} ECG channels without a lead name: leads unknown")
    raise RecordError(rel, f"no ECG channel with a voltage dimension among {len(header.samples)}")


def record_onsets(file: Path, rel: str, header: Header) -> np.ndarray:
    """The onset (s) of every data record from the time-keeping annotations (EDF+D)."""
    labels = header.signals["label"]
    if ANNOTATIONS not in labels:
        raise RecordError(rel, "EDF+D file without an 'EDF Annotations' signal")
    k = labels.index(ANNOTATIONS)
    start = 2 * sum(header.samples[:k])
    records = np.memmap(
        file,
        dtype=np.uint8,
        mode="r",
        offset=header.header_bytes,
        shape=(header.n_records, header.record_bytes),
    )
    tals = records[:, start : start + 2 * header.samples[k]]
    onsets = np.empty(header.n_records)
    for r in range(header.n_records):
        match = _TAL_ONSET.match(tals[r].tobytes())
        if match is None:
            raise RecordError(rel, f"EDF+D data record {r} has no time-keeping annotation")
        onsets[r] = float(match.group(1))
    return onsets


def longest_run(rel: str, onsets: np.ndarray, seconds: float, tolerance: float) -> range:
    """The data records of the longest contiguous run (the earliest of equal ones)."""
    step = np.diff(onsets) - seconds
    if (step < -tolerance).any():
        raise RecordError(rel, "EDF+D data records overlap or go back in time")
    breaks = [0, *(np.flatnonzero(step > tolerance) + 1).tolist(), len(onsets)]
    runs = [range(a, b) for a, b in zip(breaks[:-1], breaks[1:], strict=True)]
    return max(runs, key=len)


# --- the record -------------------------------------------------------------------------------


def _read_signals(file: Path, rel: str, header: Header, picks: list[int], records: range):
    """Physical values (float64, file units) of signals ``picks`` over ``records``, by edfio."""
    labels, seconds = header.signals["label"], header.record_seconds
    from edfio import read_edf

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an edfio warning means a file it had to guess at
            edf = read_edf(file, lazy_load_data=True)
            ordinary = [i for i, label in enumerate(labels) if label != ANNOTATIONS]
            out = []
            for i in picks:
                sig = edf.signals[ordinary.index(i)]  # edfio lists the ordinary signals only
                if sig.label != labels[i]:
                    raise RecordError(rel, "edfio and the header disagree on the signals")
                if sig.physical_min == sig.physical_max or sig.digital_min >= sig.digital_max:
                    raise RecordError(rel, f"signal {i}: degenerate physical/digital range")
                out.append(sig.get_data_slice(records.start * seconds, records.stop * seconds))
            return out
    except RecordError:
        raise
    except Exception as e:  # noqa: BLE001 - edfio raises many types on damaged headers
        raise RecordError(rel, f"unreadable EDF signal data ({type(e).__name__})") from None


def read_record(src: Path, rel: str, opts: ReadOptions | None = None) -> RawRecord:
    """Read the EDF/EDF+ file ``rel`` below ``src`` (the rules of the module docstring)."""
    opts = opts or DEFAULT_OPTIONS
    file = inside_src(source_root(src), rel, rel, opts)
    if not file.is_file():
        raise RecordError(rel, "file not found")
    header = read_header(file, rel)
    channels = ecg_channels(rel, header)
    rates = {header.samples[i] / header.record_seconds for i, _, _ in channels}
    if len(rates) != 1:
        raise RecordError(rel, "the ECG channels have different sampling rates")
    fs = rates.pop()
    check_length(rel, fs, 0, opts)
    records = range(header.n_records)
    if header.plus == "EDF+D":
        onsets = record_onsets(file, rel, header)
        records = longest_run(rel, onsets, header.record_seconds, 0.5 / fs)
    n = round(len(records) * header.record_seconds * fs)
    check_length(rel, fs, n, opts)
    data = _read_signals(file, rel, header, [i for i, _, _ in channels], records)
    signal = np.stack([x * scale for x, (_, _, scale) in zip(data, channels, strict=True)])
    if not np.isfinite(signal).all():
        raise RecordError(rel, "signal contains NaN or infinite values")
    code, sex, age = patient(header)
    return file_record(
        SOURCE,
        rel,
        signal=signal.astype(np.float32),
        fs=fs,
        lead_names=[lead for _, lead, _ in channels],
        patient_id=code,
        age=age,
        sex=sex,
    )
