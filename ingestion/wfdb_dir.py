"""Generic WFDB directory reader (any rate, any lead names, multi-file records), and the shared
``read_wfdb`` helper the PTB-XL and CPSC 2021 readers build on.

Every ``*.hea`` under the source root is one record (single-segment; multi-segment records are
merged by wfdb). Signals come from ``wfdb.rdrecord`` in physical units with the ADC baseline
removed, then are scaled to millivolts from each channel's units (mV, uV, V). Channels whose
units are not a voltage (pleth ``NU``, ABP ``mmHg``, ...) are dropped here; channels that are
voltages but not one of the 12 leads (Frank ``vx vy vz``, a bare ``V``) are kept in the
``RawRecord`` and dropped by conditioning. Age and sex come from ``key: value`` comments when the
header has them (PTB Diagnostic style); otherwise NaN / "". Generic WFDB folders have no patient
field: ``patient_id`` is None.
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

SOURCE = "wfdb"
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
    non-voltage channels dropped. RecordError for every way a record can be unreadable."""
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
    keep, scale = [], []
    for i, unit in enumerate(rec.units or ["mV"] * rec.n_sig):
        factor = unit_scale_to_mv(unit)
        if factor is not None:
            keep.append(i)
            scale.append(factor)
    signal = (p[:, keep].T * np.asarray(scale)[:, None]).astype(np.float32)
    return signal, float(rec.fs), [rec.sig_name[i] for i in keep], list(rec.comments or [])


def read_record(src: Path, rel: str) -> RawRecord:
    """Read one WFDB record (``rel`` relative to ``src``, without extension)."""
    signal, fs, names, comments = read_wfdb(src, rel)
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
    )
