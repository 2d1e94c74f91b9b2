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
5. stored as int16 microvolts (rounded, clipped to the int16 range, i.e. +-32.767 mV);
6. only with ``--filter`` (``ReadOptions.signal_filter``; off by default, as in the paper):
   zero-phase band-pass and/or notch filters over the whole record at 500 Hz, lead by lead
   (``ingestion.filters``), recorded in ``ConditionedRecord.filter``.

Steps 1-5 run a block of ``BLOCK_SAMPLES`` input samples at a time (``blocks``: each block of
output segments from the input window its filter reaches), bit-identical to the whole signal at
once; with a reader's ``open_record`` (``RawRecord.signal`` a ``BlockSignal``) only a block of
the input is ever in memory, whatever the record's duration.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from ecgplat.leads import LEADS, canonical_lead
from ecgplat.store import DTYPE, SAMPLE_RATE, SEGMENT_SAMPLES, SEGMENT_SECONDS, UV_PER_MV
from ingestion.filters import canonical_spec, filter_segments
from ingestion.readers.options import ReadOptions, check_length
from ingestion.readers.record import RawRecord, RecordError, signal_block
from ingestion.readers.units import store_unit

MAX_DENOMINATOR = 1000
# input samples per channel conditioning reads at once (about 13 s at 10 kHz): with the block's
# float copies, what a record needs beyond its 500 Hz int16 output, whatever its duration
BLOCK_SAMPLES = 1 << 17
# scipy.signal.resample_poly's filter reaches 10 * max(up, down) upsampled samples either side
FILTER_HALF_LENGTH = 10
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
    filter: str = ""  # the canonical --filter spec applied ("" = none; ingestion.filters)

    @property
    def record_key(self) -> str:
        return f"{self.source}/{self.record_id}"

    @property
    def n_segments(self) -> int:
        return int(self.segments.shape[0])


def lead_rows(
    lead_names: list[str], n_channels: int, path: str = "?"
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """(channel row, canonical lead index) of every channel kept (the first of a lead wins; non-ECG
    channels are dropped) and the bool (12,) present mask."""
    if len(lead_names) != n_channels:
        raise RecordError(path, f"{n_channels} channels but {len(lead_names)} lead names")
    rows = []
    mask = np.zeros(len(LEADS), dtype=bool)
    for row, name in enumerate(lead_names):
        lead = canonical_lead(name)
        if lead is None:
            continue
        idx = LEADS.index(lead)
        if not mask[idx]:
            rows.append((row, idx))
            mask[idx] = True
    if not mask.any():
        raise RecordError(path, f"no ECG lead among channels {', '.join(map(str, lead_names))}")
    return rows, mask


def canonical_leads(
    signal: np.ndarray, lead_names: list[str], path: str = "?", dtype=np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """(12, T) array of ``dtype`` in canonical order and the bool (12,) present mask."""
    rows, mask = lead_rows(lead_names, signal.shape[0], path)
    return _place(signal, rows, dtype), mask


def _place(signal: np.ndarray, rows: list[tuple[int, int]], dtype) -> np.ndarray:
    out = np.zeros((len(LEADS), signal.shape[1]), dtype=dtype)
    for row, idx in rows:
        out[idx] = signal[row]
    return out


def _ratio(fs: float, target: int = SAMPLE_RATE) -> Fraction:
    if float(fs) == target:  # the common case, without building a Fraction
        return Fraction(1)
    return Fraction(target / float(fs)).limit_denominator(MAX_DENOMINATOR)


def resample_to(x: np.ndarray, fs: float, target: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling of ``x (..., T)`` from ``fs`` to ``target`` Hz along the last axis."""
    return _resample(x, _ratio(fs, target))


def _resample(x: np.ndarray, ratio: Fraction) -> np.ndarray:
    if ratio == 1:
        return x
    # imported here: scipy.signal pulls in scipy.stats & co. (seconds of import per worker
    # process on a loaded machine) and 500 Hz records never need it
    from scipy.signal import resample_poly

    return resample_poly(x, ratio.numerator, ratio.denominator, axis=-1)


def resampled_length(n: int, ratio: Fraction) -> int:
    """Samples ``resample_poly`` gives for ``n`` input samples: ceil(n * up / down)."""
    return -(-n * ratio.numerator // ratio.denominator)


def blocks(n_in: int, ratio: Fraction, n_keep: int, step: int) -> Iterator[tuple[int, ...]]:
    """(k0, k1, a, b): output samples ``k0:k1`` of ``resample_poly`` over ``n_in`` input samples
    (up to ``n_keep``, ``step`` at a time) and the input window ``a:b`` that gives them exactly.
    Output k weighs the inputs within ``half`` upsampled samples of ``k * down`` (the filter's
    taps, ``FILTER_HALF_LENGTH``); ``a`` is a multiple of ``down``, so that the window's own
    output ``k - a * up / down`` has the same phase and sums the same products in the same order
    (inputs outside the taps add zeros)."""
    up, down = ratio.numerator, ratio.denominator
    half = FILTER_HALF_LENGTH * max(up, down)
    for k0 in range(0, n_keep, step):
        k1 = min(k0 + step, n_keep)
        if ratio == 1:
            yield k0, k1, k0, k1
            continue
        lo = max(0, (k0 * down - half) // up - 1)
        yield k0, k1, lo - lo % down, min(n_in, ((k1 - 1) * down + half) // up + 2)


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


def _below(value: float, limit: float) -> str:
    """``value`` (< ``limit``) with 2 decimals, or as many more as it takes not to print a number
    that reads as ``limit`` (4.998 s is "4.998", not "5.00")."""
    for digits in range(2, 10):
        text = f"{value:.{digits}f}"
        if float(text) < limit:
            return text
    return repr(value)


def condition(rec: RawRecord, opts: ReadOptions | None = None) -> ConditionedRecord:
    """Canonical leads, checks, 500 Hz, 5 s int16 µV segments (see module docstring); the rate
    range and maximum duration of ``opts`` bound the samples a record may have. The signal is
    read, checked and resampled a block at a time (``BLOCK_SAMPLES``)."""
    sig = rec.signal if hasattr(rec.signal, "block") else np.asarray(rec.signal)
    if len(sig.shape) != 2:
        raise RecordError(rec.path, f"signal must be (leads, samples), got shape {sig.shape}")
    n = int(sig.shape[1])
    if n == 0 or sig.shape[0] == 0:
        raise RecordError(rec.path, "zero-length signal")
    try:
        fs = float(rec.fs)
    except (TypeError, ValueError):
        raise RecordError(rec.path, "sampling rate is not a finite positive number") from None
    check_length(rec.path, fs, n, opts)
    rows, mask = lead_rows(list(rec.lead_names), int(sig.shape[0]), rec.path)
    ratio = _ratio(fs)
    # without resampling the mV values go straight to int16 µV: keep the reader's float32 (the
    # float64 product in to_int16_microvolts is then exactly the same); resampling runs in float64
    dtype = np.float32 if ratio == 1 and sig.dtype == np.float32 else np.float64
    reader = _Blocks(sig, rows, mask, dtype, rec.path)
    n_out = resampled_length(n, ratio)
    if n / fs < SEGMENT_SECONDS or n_out < SEGMENT_SAMPLES:
        reader.read(0, n)  # a NaN is the reason before the length
        if n / fs < SEGMENT_SECONDS:
            reason = f"too short: {_below(n / fs, SEGMENT_SECONDS)} s < {SEGMENT_SECONDS} s minimum"
        else:  # rounding of a record just at 5 s
            reason = f"too short: {n_out} samples at {SAMPLE_RATE} Hz < {SEGMENT_SAMPLES}"
        raise RecordError(rec.path, reason)
    spec = canonical_spec(opts.signal_filter if opts else None)
    return ConditionedRecord(
        segments=filter_segments(_segments(reader, n, ratio, n_out // SEGMENT_SAMPLES), spec),
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
        filter=spec,
    )


class _Blocks:
    """Canonical-lead blocks of a record's signal, each checked for NaN/inf in its ECG leads."""

    def __init__(self, sig, rows: list[tuple[int, int]], mask: np.ndarray, dtype, path: str):
        self.sig, self.rows, self.mask, self.dtype, self.path = sig, rows, mask, dtype, path

    def read(self, start: int, stop: int) -> np.ndarray:
        raw = signal_block(self.sig, start, stop)
        x = _place(raw, self.rows, self.dtype)
        if not np.isfinite(raw).all() and not np.isfinite(x[self.mask]).all():  # cheap test first
            raise RecordError(self.path, "signal contains NaN or infinite values")
        return x


def _segments(reader: _Blocks, n: int, ratio: Fraction, n_segments: int) -> np.ndarray:
    """int16 (n_segments, 12, 2500) µV: the blocks of ``blocks`` resampled, cut and rounded, equal
    to conditioning the whole signal at once; the input past the last segment is checked too."""
    out = np.empty((n_segments, len(LEADS), SEGMENT_SAMPLES), dtype=DTYPE)
    per_block = max(1, BLOCK_SAMPLES * ratio.numerator // (ratio.denominator * SEGMENT_SAMPLES))
    done = 0
    for k0, k1, a, b in blocks(
        n, ratio, out.shape[0] * SEGMENT_SAMPLES, per_block * SEGMENT_SAMPLES
    ):
        y = _resample(reader.read(a, b), ratio)
        off = a * ratio.numerator // ratio.denominator
        segs = segment(y[:, k0 - off : k1 - off])
        out[k0 // SEGMENT_SAMPLES : k1 // SEGMENT_SAMPLES] = to_int16_microvolts(segs)
        done = max(done, b)
    for a in range(done, n, BLOCK_SAMPLES):  # the dropped tail is checked like the rest
        reader.read(a, min(n, a + BLOCK_SAMPLES))
    return out
