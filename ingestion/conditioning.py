"""Signal conditioning shared by every reader: canonical leads, checks, 500 Hz, 5 s int16 segments.

``condition(rec)`` turns a ``RawRecord`` (any lead set, any rate, float mV) into the store's unit:

1. channels are mapped to the canonical order I..V6 (``ecgplat.leads``); non-ECG channels are
   dropped, absent leads stay zero and are False in ``lead_mask`` (never derived or invented);
   the first channel wins if a lead appears twice;
2. rejected with ``RecordError``: zero-length signal, a sampling rate outside the supported
   range or a duration above the maximum (``ingestion.readers.options.ReadOptions``), no ECG lead,
   NaN/inf in an ECG lead, shorter than 5 s;
3. resampled to 500 Hz with ``scipy.signal.resample_poly`` (anti-aliased polyphase filter; the
   up/down ratio is ``Fraction(500 / fs)`` limited to denominators <= 1000);
4. cut into non-overlapping 2500-sample (5 s) segments starting at sample 0; a trailing partial
   segment is dropped (as in the paper's preprocessing);
5. stored as int16 microvolts (rounded, clipped to the int16 range, i.e. +-32.767 mV).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from ecgplat.leads import LEADS, canonical_lead
from ecgplat.store import DTYPE, SAMPLE_RATE, SEGMENT_SAMPLES, SEGMENT_SECONDS, UV_PER_MV
from ingestion.readers.options import ReadOptions, check_length
from ingestion.readers.record import RawRecord, RecordError
from ingestion.readers.units import store_unit

MAX_DENOMINATOR = 1000
_I16 = np.iinfo(DTYPE)


@dataclass
class ConditionedRecord:
    """A record ready for the store: int16 µV segments in canonical lead order plus metadata."""

    segments: np.ndarray  # int16 (S, 12, 2500) microvolts
    lead_mask: np.ndarray  # bool (12,): which canonical leads the file had
    n_samples_original: int
    fs_original: float
    source: str
    record_id: str
    path: str
    patient_id: str | None = field(default=None, repr=False)  # RAW: the writer pseudonymises it
    codes: list[str] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(26, dtype=bool))
    age: float = float("nan")
    sex: str = ""
    extra: dict = field(default_factory=dict)
    units: str = "uV"  # the store's records/units value: "uV", or "z" (ingestion.readers.units)

    @property
    def record_key(self) -> str:
        return f"{self.source}/{self.record_id}"

    @property
    def n_segments(self) -> int:
        return int(self.segments.shape[0])


def canonical_leads(
    signal: np.ndarray, lead_names: list[str], path: str = "?", dtype=np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """(12, T) array of ``dtype`` in canonical order and the bool (12,) present mask."""
    if len(lead_names) != signal.shape[0]:
        raise RecordError(path, f"{signal.shape[0]} channels but {len(lead_names)} lead names")
    out = np.zeros((len(LEADS), signal.shape[1]), dtype=dtype)
    mask = np.zeros(len(LEADS), dtype=bool)
    for row, name in enumerate(lead_names):
        lead = canonical_lead(name)
        if lead is None:
            continue
        idx = LEADS.index(lead)
        if not mask[idx]:
            out[idx] = signal[row]
            mask[idx] = True
    if not mask.any():
        raise RecordError(path, f"no ECG lead among channels {', '.join(map(str, lead_names))}")
    return out, mask


def _ratio(fs: float, target: int = SAMPLE_RATE) -> Fraction:
    if float(fs) == target:  # the common case, without building a Fraction
        return Fraction(1)
    return Fraction(target / float(fs)).limit_denominator(MAX_DENOMINATOR)


def resample_to(x: np.ndarray, fs: float, target: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling of ``x (..., T)`` from ``fs`` to ``target`` Hz along the last axis."""
    ratio = _ratio(fs, target)
    if ratio == 1:
        return x
    # imported here: scipy.signal pulls in scipy.stats & co. (seconds of import per worker
    # process on a loaded machine) and 500 Hz records never need it
    from scipy.signal import resample_poly

    return resample_poly(x, ratio.numerator, ratio.denominator, axis=-1)


def segment(x: np.ndarray, length: int = SEGMENT_SAMPLES) -> np.ndarray:
    """Non-overlapping windows from sample 0: (C, T) -> (T // length, C, length); tail dropped."""
    n = x.shape[-1] // length
    return x[:, : n * length].reshape(x.shape[0], n, length).transpose(1, 0, 2)


def to_int16_microvolts(x_mv: np.ndarray) -> np.ndarray:
    # one float64 temporary (the input's float32 -> float64 cast is exact and fused into the
    # product), rounded and clipped in place
    y = np.multiply(x_mv, UV_PER_MV, dtype=np.float64)
    np.rint(y, out=y)
    np.clip(y, _I16.min, _I16.max, out=y)
    return y.astype(DTYPE)


def condition(rec: RawRecord, opts: ReadOptions | None = None) -> ConditionedRecord:
    """Canonical leads, checks, 500 Hz, 5 s int16 µV segments (see module docstring); the rate
    range and maximum duration of ``opts`` bound the memory resampling may take."""
    sig = np.asarray(rec.signal)
    if sig.ndim != 2:
        raise RecordError(rec.path, f"signal must be (leads, samples), got shape {sig.shape}")
    n = int(sig.shape[1])
    if n == 0 or sig.shape[0] == 0:
        raise RecordError(rec.path, "zero-length signal")
    try:
        fs = float(rec.fs)
    except (TypeError, ValueError):
        raise RecordError(rec.path, "sampling rate is not a finite positive number") from None
    check_length(rec.path, fs, n, opts)
    # without resampling the mV values go straight to int16 µV: keep the reader's float32 (the
    # float64 product in to_int16_microvolts is then exactly the same); resampling runs in float64
    no_resample = _ratio(fs) == 1 and sig.dtype == np.float32
    x, mask = canonical_leads(
        sig, list(rec.lead_names), rec.path, np.float32 if no_resample else np.float64
    )
    if not np.isfinite(sig).all() and not np.isfinite(x[mask]).all():  # cheap test first
        raise RecordError(rec.path, "signal contains NaN or infinite values")
    seconds = n / fs
    if seconds < SEGMENT_SECONDS:
        raise RecordError(rec.path, f"too short: {seconds:.2f} s < {SEGMENT_SECONDS} s minimum")
    x = resample_to(x, fs)
    segs = segment(x)
    if segs.shape[0] == 0:  # rounding of a record just at 5 s
        raise RecordError(
            rec.path, f"too short: {x.shape[-1]} samples at {SAMPLE_RATE} Hz < {SEGMENT_SAMPLES}"
        )
    return ConditionedRecord(
        segments=to_int16_microvolts(segs),
        lead_mask=mask,
        n_samples_original=n,
        fs_original=fs,
        source=rec.source,
        record_id=rec.record_id,
        path=rec.path,
        patient_id=rec.patient_id,
        codes=list(rec.codes),
        labels=np.asarray(rec.labels, dtype=bool).copy(),
        age=float(rec.age),
        sex=rec.sex,
        extra=dict(rec.extra),
        units=store_unit(rec.units),
    )
