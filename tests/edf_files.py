"""EDF/EDF+ files written byte by byte for the reader tests: an independent writer (not edfio, which
the reader uses), so the tests check the reader against the format, not against itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

ANNOTATION_SAMPLES = 30  # int16 "samples" (60 bytes) of the EDF Annotations signal per record


@dataclass
class Channel:
    """One ordinary signal: its label, int16 digital samples (all records) and scaling."""

    label: str
    digital: np.ndarray
    samples: int  # per data record
    dimension: str = "uV"
    physical: tuple[float, float] = (-32768, 32767)
    digital_range: tuple[int, int] = (-32768, 32767)

    def physical_values(self) -> np.ndarray:
        """The physical values the EDF scaling gives (float64, in ``dimension``)."""
        (pmin, pmax), (dmin, dmax) = self.physical, self.digital_range
        gain = (pmax - pmin) / (dmax - dmin)
        return (self.digital.astype(np.float64) - dmin) * gain + pmin


def _field(value, width: int) -> bytes:
    text = value if isinstance(value, str) else f"{value:g}"
    raw = text.encode("ascii")
    assert len(raw) <= width, (text, width)
    return raw.ljust(width)


def _tal(onset: float) -> bytes:
    tal = f"+{onset:g}".encode() + b"\x14\x14\x00"
    return tal.ljust(2 * ANNOTATION_SAMPLES, b"\x00")


def write_edf(
    path: Path,
    channels: list[Channel],
    record_seconds: float = 1.0,
    plus: str = "EDF+C",
    onsets: list[float] | None = None,
    patient: str = "X X X X",
    recording: str = "Startdate X X X X",
    startdate: str = "01.01.20",
    declared_records: int | None = None,
) -> Path:
    """Write an EDF file (EDF+ with an ``EDF Annotations`` signal holding each record's
    time-keeping TAL at ``onsets``, default contiguous, unless ``plus`` is ""). The header's
    data-record count is ``declared_records`` when given (to write inconsistent files)."""
    n_records = len(channels[0].digital) // channels[0].samples
    assert all(len(c.digital) == n_records * c.samples for c in channels)
    onsets = onsets if onsets is not None else [r * record_seconds for r in range(n_records)]
    rows = [(c.label, c.dimension, *c.physical, *c.digital_range, c.samples) for c in channels]
    if plus:
        rows.append(("EDF Annotations", "", -1, 1, -32768, 32767, ANNOTATION_SAMPLES))
    ns = len(rows)
    count = n_records if declared_records is None else declared_records
    head = b"".join(
        [
            _field("0", 8),
            _field(patient, 80),
            _field(recording, 80),
            _field(startdate, 8),
            _field("10.00.00", 8),
            _field(256 * (ns + 1), 8),
            _field(plus, 44),
            _field(count, 8),
            _field(record_seconds, 8),
            _field(ns, 4),
        ]
    )
    widths = (16, 80, 8, 8, 8, 8, 8, 80, 8, 32)
    columns = [
        [r[0] for r in rows],
        [""] * ns,
        [r[1] for r in rows],
        *[[r[k] for r in rows] for k in range(2, 6)],
        [""] * ns,
        [r[6] for r in rows],
        [""] * ns,
    ]
    for values, width in zip(columns, widths, strict=True):
        head += b"".join(_field(v, width) for v in values)
    data = bytearray()
    for r in range(n_records):
        for c in channels:
            data += c.digital[r * c.samples : (r + 1) * c.samples].astype("<i2").tobytes()
        if plus:
            data += _tal(onsets[r])
    path.write_bytes(head + bytes(data))
    return path
