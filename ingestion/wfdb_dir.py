"""Generic WFDB directory reader (any rate, any lead names, multi-file records), and the shared
``read_wfdb`` helper the PTB-XL and CPSC 2021 readers build on.

Every ``*.hea`` under the source root is one record (single-segment; multi-segment records are
merged by wfdb). Signals come from ``wfdb.rdrecord`` in physical units with the ADC baseline
removed, then are scaled to millivolts from each channel's units (mV, uV, V). Channels whose
units are not a voltage (pleth ``NU``, ABP ``mmHg``, ...) are dropped here; channels that are
voltages but not one of the 12 leads (Frank ``vx vy vz``, a bare ``V``) are kept in the
``RawRecord`` and dropped by conditioning. Age and sex come from ``key: value`` comments when the
header has them (PTB Diagnostic style); otherwise NaN / "". Generic WFDB folders have no patient
field: ``patient_id`` is None. A record with no voltage channel is rejected with a reason naming
its units; with ``--units z`` (``read_record(..., units="z")``) a record whose channels are all
in unit ``z`` is read as it is and marked ``units="z"`` (see ``ingestion.units``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import wfdb

from ingestion.record import (
    RawRecord,
    RecordError,
    comment_fields,
    parse_age,
    parse_sex,
    unit_scale_to_mv,
)
from ingestion.units import VOLTAGE, accepted_unit, not_voltage_reason

SOURCE = "wfdb"
OPTIONS = ("units",)  # reader options `ecgplat ingest wfdb` passes on (read_record keywords)
try:  # the sample formats wfdb can decode (a private table; fall back to wfdb 4.x's list)
    from wfdb.io._signal import DAT_FMTS as _DAT_FMTS
except ImportError:  # pragma: no cover
    _DAT_FMTS = ["8", "16", "32", "61", "80", "160", "212", "310", "311", "24", "508", "516", "524"]


def list_records(src: Path) -> list[str]:
    """Relative record paths (no extension) of every ``.hea`` under ``src``, sorted."""
    src = Path(src)
    return sorted(
        p.relative_to(src).with_suffix("").as_posix()
        for p in src.rglob("*.hea")
        if not p.name.startswith(".")
    )


def read_wfdb(src: Path, rel: str) -> tuple[np.ndarray, float, list[str], list[str]]:
    """(signal (n_ch, n) float32 mV, fs, channel names, header comments) of a WFDB record;
    non-voltage channels dropped. RecordError for every way a record can be unreadable, and
    for a record without any voltage channel (the reason names its units)."""
    return read_wfdb_units(src, rel)[:4]


def read_wfdb_units(
    src: Path, rel: str, accept: str | None = None
) -> tuple[np.ndarray, float, list[str], list[str], str]:
    """``read_wfdb`` plus the signal's unit: "mV", or ``accept`` (a non-voltage unit such as
    "z") for a record with no voltage channel whose channels are in that unit."""
    base = Path(src) / rel
    if not base.with_suffix(".hea").exists():
        raise RecordError(rel, f"missing header file {base.name}.hea")
    try:
        header = wfdb.rdheader(str(base))
    except Exception as e:  # noqa: BLE001 - wfdb raises many types on malformed headers
        raise RecordError(rel, f"unparsable header: {e}") from None
    bad = sorted({str(f) for f in (header.fmt or []) if str(f) not in _DAT_FMTS})
    if bad:
        raise RecordError(rel, f"unknown format: WFDB sample format(s) {bad} not supported")
    files = sorted({f for f in (header.file_name or []) if f})
    if not files:
        raise RecordError(rel, "unknown format: header lists no signal files (multi-segment?)")
    for name in files:
        if not (base.parent / name).exists():
            raise RecordError(rel, f"missing signal file {name}")
    try:
        rec = wfdb.rdrecord(str(base), physical=True)
    except Exception as e:  # noqa: BLE001 - and on short/damaged signal files
        raise RecordError(rel, f"signal file truncated or unreadable: {e}") from None
    p = rec.p_signal
    if p is None or p.ndim != 2 or p.shape != (rec.sig_len, rec.n_sig):
        shape = None if p is None else p.shape
        raise RecordError(
            rel,
            f"signal shape {shape} does not match header "
            f"({rec.sig_len} samples x {rec.n_sig} channels): truncated?",
        )
    units = list(rec.units or ["mV"] * rec.n_sig)
    keep, scale, unit = channel_scales(units, accept)
    if not keep:
        raise RecordError(rel, not_voltage_reason(units))
    signal = (p[:, keep].T * np.asarray(scale)[:, None]).astype(np.float32)
    names = [rec.sig_name[i] for i in keep]
    return signal, float(rec.fs), names, list(rec.comments or []), unit


def channel_scales(units: list[str], accept: str | None) -> tuple[list[int], list[float], str]:
    """(channels kept, factor of each, signal unit): the voltage channels scaled to mV; when
    there are none and ``accept`` names a non-voltage unit (``--units z``), the channels in that
    unit as they are."""
    keep, scale = [], []
    for i, unit in enumerate(units):
        factor = unit_scale_to_mv(unit)
        if factor is not None:
            keep.append(i)
            scale.append(factor)
    if keep or accept is None:
        return keep, scale, VOLTAGE
    keep = [i for i, unit in enumerate(units) if str(unit).strip().lower() == accept]
    return keep, [1.0] * len(keep), accept


def read_record(src: Path, rel: str, units: str | None = None) -> RawRecord:
    """Read one WFDB record (``rel`` relative to ``src``, without extension); ``units`` (the
    ``--units`` option, e.g. "z") opts into records whose channels are in that non-voltage unit."""
    signal, fs, names, comments, unit = read_wfdb_units(src, rel, accepted_unit(units))
    fields = comment_fields(comments)
    return RawRecord(
        source=SOURCE,
        record_id=rel,
        path=rel,
        signal=signal,
        fs=fs,
        lead_names=names,
        patient_id=None,
        age=parse_age(fields.get("age")),
        sex=parse_sex(fields.get("sex")),
        units=unit,
    )
