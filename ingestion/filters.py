"""Optional zero-phase signal filters of an ingest (``--filter``): a band-pass and a mains notch.

The paper's preprocessing filters nothing, so the default is off. ``--filter`` takes a comma
list of

- ``bandpass=LO-HI`` (Hz, ``0 < LO < HI < 250``): a Butterworth band-pass of order
  ``BANDPASS_ORDER`` as second-order sections, run forward and backward
  (``scipy.signal.sosfiltfilt``);
- ``notch=F`` (Hz, ``0 < F < 250``, typically 50 or 60): ``scipy.signal.iirnotch`` with quality
  factor ``NOTCH_Q``, run forward and backward (``scipy.signal.filtfilt``).

Both run forward and backward, so they shift no wave in time (zero phase) and the magnitude
response is squared. They run in conditioning on each record's whole signal *after* it is
resampled to 500 Hz: one design per spec serves every record whatever its original rate (a
50 Hz notch could not even be designed for a 100 Hz file, whose Nyquist frequency it is), and
the anti-aliasing of the resampler has already removed what lies above the new Nyquist
frequency. Filtering before segmentation keeps filter edges out of all but the record's own
ends, which are padded by odd reflection (``PAD_SECONDS``). The canonical spec
(``canonical_spec``: bandpass first, numbers as ``%g``) is the store's per-record ``filter``
column ("" when off) and enters feature lineages.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

FILTER_RATE = 500  # Hz: the rate filters run at (the store's rate, after resampling)
BANDPASS_ORDER = 4
NOTCH_Q = 30.0
PAD_SECONDS = 2.0  # odd-reflection padding at each end of a record
_NYQUIST = FILTER_RATE / 2


def _number(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--filter {spec!r}: {text!r} is not a number of Hz") from None
    if not (math.isfinite(value) and 0 < value < _NYQUIST):
        raise ValueError(f"--filter {spec!r}: {text} Hz is outside 0-{_NYQUIST:g} Hz")
    return value


def parse_filter(spec: str | None) -> dict[str, tuple[float, ...]]:
    """``{"bandpass": (lo, hi), "notch": (f,)}`` (the parts given) of a ``--filter`` spec; an
    empty dict for None. ValueError, one line naming --filter, for anything else."""
    if spec is None:
        return {}
    parts: dict[str, tuple[float, ...]] = {}
    items = [item.strip() for item in str(spec).split(",")]
    if not any(items):
        raise ValueError("--filter: empty spec (use e.g. bandpass=0.5-40,notch=50)")
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("bandpass", "notch"):
            raise ValueError(
                f"--filter {spec!r}: {item!r} is not bandpass=LO-HI or notch=HZ "
                "(e.g. bandpass=0.5-40,notch=50)"
            )
        if key in parts:
            raise ValueError(f"--filter {spec!r}: {key} is given twice")
        if key == "notch":
            parts[key] = (_number(value.strip(), spec),)
            continue
        lo, dash, hi = value.strip().partition("-")
        if not dash:
            raise ValueError(f"--filter {spec!r}: bandpass needs LO-HI in Hz, e.g. 0.5-40")
        band = (_number(lo.strip(), spec), _number(hi.strip(), spec))
        if band[0] >= band[1]:
            raise ValueError(f"--filter {spec!r}: the band's low edge must be below its high edge")
        parts[key] = band
    return parts


def canonical_spec(spec: str | None) -> str:
    """The spec as stored: ``bandpass=LO-HI,notch=F`` (the parts given, %g numbers); ""."""
    parts = parse_filter(spec)
    out = []
    if "bandpass" in parts:
        out.append("bandpass={:g}-{:g}".format(*parts["bandpass"]))
    if "notch" in parts:
        out.append("notch={:g}".format(*parts["notch"]))
    return ",".join(out)


@lru_cache(maxsize=8)
def _design(spec: str) -> tuple:
    from scipy.signal import butter, iirnotch

    parts = parse_filter(spec)
    sos = None
    if "bandpass" in parts:
        sos = butter(
            BANDPASS_ORDER, parts["bandpass"], btype="bandpass", fs=FILTER_RATE, output="sos"
        )
    notch = iirnotch(parts["notch"][0], NOTCH_Q, fs=FILTER_RATE) if "notch" in parts else None
    return sos, notch


def apply_filter(x: np.ndarray, spec: str) -> np.ndarray:
    """``x (leads, T)`` at ``FILTER_RATE`` filtered by ``spec`` (canonical, non-empty), as
    float64, lead by lead (one lead's temporaries at a time); an all-zero (absent) lead stays
    zero."""
    out = np.array(x, dtype=np.float64)
    for row in range(out.shape[0]):
        out[row] = _filter_lead(out[row], spec)
    return out


def _filter_lead(y: np.ndarray, spec: str) -> np.ndarray:
    from scipy.signal import filtfilt, sosfiltfilt

    if not y.any():
        return y
    sos, notch = _design(spec)
    pad = min(len(y) - 1, int(PAD_SECONDS * FILTER_RATE))
    if sos is not None:
        y = sosfiltfilt(sos, y, padlen=pad)
    if notch is not None:
        y = filtfilt(notch[0], notch[1], y, padlen=pad)
    return y


def filter_segments(segments: np.ndarray, spec: str) -> np.ndarray:
    """A record's int16 segments ``(S, 12, 2500)`` (consecutive windows of one signal at
    ``FILTER_RATE``) filtered as one signal per lead and rounded back to int16 (clipped), in
    place. Conditioning resamples and cuts a record block by block; the filters, which look at
    the whole record, run on its int16 result one lead at a time, so memory stays at one lead's
    float64 copy. Rounding before filtering adds at most 0.5 µV of white noise."""
    if not spec or not len(segments):
        return segments
    info = np.iinfo(segments.dtype)
    for lead in range(segments.shape[1]):
        y = _filter_lead(segments[:, lead, :].astype(np.float64).ravel(), spec)
        np.rint(y, out=y)
        np.clip(y, info.min, info.max, out=y)
        segments[:, lead, :] = y.reshape(segments.shape[0], segments.shape[2])
    return segments
