"""The record type every corpus reader yields, and the one error type for a bad record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ecgplat.labels import NUM_CLASSES

RECORD_SUFFIXES = (".hea", ".mat", ".dat")  # a WFDB record's header and signal file suffixes


class RecordError(Exception):
    """A record that cannot be read or used; ``str(e) == f"{path}: {reason}"`` on one line."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # keep it on one line
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # picklable across dask workers
        return (type(self), (self.path, self.reason))


class BlockSignal(Protocol):
    """A signal read from its files block by block, on demand, rather than at once (a reader's
    ``open_record``): conditioning never holds more than a block of it. ``block(start, stop)``
    gives samples ``start:stop`` of every channel, exactly the values of a whole read."""

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def block(self, start: int, stop: int) -> np.ndarray: ...


def signal_block(signal: np.ndarray | BlockSignal, start: int, stop: int) -> np.ndarray:
    """Samples ``start:stop`` of every channel of a ``RawRecord.signal`` (array or blocks)."""
    if isinstance(signal, np.ndarray):
        return signal[:, start:stop]
    return signal.block(start, stop)


@dataclass
class RawRecord:
    """One recording as read from its corpus: physical units, nothing resampled or reordered.

    ``patient_id`` is the RAW identifier and must only ever be passed to
    ``ecgplat.privacy.pseudonymise`` (by the store writer); never print or log it.
    """

    source: str  # "cinc2021" | "ptbxl" | "wfdb" | "cpsc2021"
    record_id: str  # unique within the source, e.g. "E07500", "00013"
    path: str  # record path relative to the source root, without extension
    signal: np.ndarray | BlockSignal  # (n_leads, n_samples) float32, millivolts, baseline
    # removed; a BlockSignal only from a reader's open_record (read_record gives the array)
    fs: float  # original sampling rate, Hz
    lead_names: list[str]  # as in the file
    patient_id: str | None = field(default=None, repr=False)
    codes: list[str] = field(default_factory=list)  # SNOMED (cinc2021) or SCP (ptbxl)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(NUM_CLASSES, dtype=bool))
    age: float = float("nan")
    sex: str = ""  # "M" | "F" | ""
    extra: dict = field(default_factory=dict)
    units: str = "mV"  # of `signal`: "mV", or a non-voltage unit the user opted into ("z")

    @property
    def n_samples(self) -> int:
        return int(self.signal.shape[-1])


# --- header comment helpers shared by the readers -------------------------------------------


def comment_fields(comments: list[str]) -> dict[str, str]:
    """``key: value`` header comments as a dict with lower-case keys (first occurrence wins).
    Accepts the leading ``#`` with or without a space (``#Dx: ...`` and ``# Dx: ...``)."""
    out: dict[str, str] = {}
    for line in comments:
        text = line.strip().lstrip("#").strip()
        key, sep, value = text.partition(":")
        if sep and key.strip():
            out.setdefault(key.strip().lower(), value.strip())
    return out


def parse_age(value) -> float:
    """Age in years, NaN when missing or not a number ("NaN", "Unknown", "")."""
    try:
        age = float(str(value).strip())
    except (TypeError, ValueError):
        return float("nan")
    return age if np.isfinite(age) and age >= 0 else float("nan")


def parse_sex(value) -> str:
    """ "M", "F" or "" from spellings such as "Male", "female", "M", "f"."""
    text = str(value or "").strip().lower()
    if text in ("m", "male", "man"):
        return "M"
    if text in ("f", "female", "woman"):
        return "F"
    return ""


_UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3, "nv": 1e-6}


def unit_scale_to_mv(unit: str | None) -> float | None:
    """Factor converting a WFDB physical unit to millivolts (None if it is not a voltage)."""
    return _UNIT_TO_MV.get(str(unit or "mV").strip().lower())
