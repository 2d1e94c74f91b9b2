"""SCP-ECG (EN 1064, protocol versions 1.x and 2.x) files: one record per file, the rhythm data in
millivolts at the file's own rate.

A file is recognised by its layout (``scp_sections.looks_like_scp``: section 0 at byte 6 pointing
at itself), whatever its extension. The decoder is ours, written from the standard
(``ingestion.readers.scp_sections``, ``ingestion.readers.scp_huffman``): the record length must
be the file's size, every section must lie inside the file and every CRC-CCITT (record and
sections) must match before anything is decoded. The signal is section 6 (rhythm data): each
lead's bytes Huffman-decoded with the default table (section 2 = 19999) or read as int16 when
section 2 is absent, the first or second differences undone, times the amplitude multiplier
(nV) and the rate from the sample interval (µs). Section 3 names the leads (ids 1-8 and 61-64
are the 12 standard leads; any other id becomes ``SCP-<id>``, which is no ECG lead and is
dropped by conditioning).

Refused with a reason: a truncated or oversized file, a section past the end of the file, a CRC
mismatch, a protocol version other than 1.x/2.x, no section 3 or 6, leads covering different
sample ranges, reference-beat subtraction (section 3 flag; sections 4 and 5 are then needed to
rebuild the rhythm and are not implemented), bimodal compression, Huffman tables carried in the
file, lead data that end early.

Allow-list (``ingestion.readers.clinical``): of section 1, only tag 2 (patient id: the raw
identifier, pseudonymised by the store writer), tag 8 (sex) and the age (tag 4 with its unit,
else tag 5 birth date with tag 25 acquisition date; the dates are then dropped; whole years,
capped at 90) are read. Every other tag (names, race, device, institution, physicians, times,
free text) is skipped unread.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ingestion.readers.clinical import (
    age_from_dates,
    file_record,
    list_files,
    read_file,
    safe_age,
)
from ingestion.readers.options import DEFAULT_OPTIONS, ReadOptions, check_length
from ingestion.readers.record import RawRecord, RecordError
from ingestion.readers.scp_huffman import decode
from ingestion.readers.scp_sections import (
    DEFAULT_HUFFMAN,
    ScpError,
    Section,
    lead_data,
    lead_name,
    leads,
    looks_like_scp,
    parse_record,
    patient_fields,
    patient_tags,
    rhythm_header,
    undifference,
)

SOURCE = "scp"
MAX_SCP_BYTES = 64 * 1024 * 1024  # larger files are refused before reading
HEAD_BYTES = 64  # enough for the record header, section 0's header and its first pointer


def list_records(src: Path) -> list[str]:
    """Paths (with extension, if any) of the SCP-ECG files: ``src`` itself, or every one below."""
    return list_files(src, looks_like_scp, HEAD_BYTES)


def _sections(src: Path, rel: str, opts: ReadOptions | None) -> dict[int, Section]:
    data = read_file(src, rel, opts, MAX_SCP_BYTES, "SCP-ECG file")
    try:
        return parse_record(data)
    except ScpError as e:
        raise RecordError(rel, str(e)) from None


def patient_hint(src: Path, rel: str, opts: ReadOptions | None = None) -> str | None:
    """The raw patient id (section 1, tag 2) of a file that decodes; None otherwise."""
    try:
        sections = _sections(src, rel, opts)
        tags = patient_tags(sections[1].body) if 1 in sections else {}
        return patient_fields(tags)[0]
    except (RecordError, ScpError):
        return None


def _huffman_coded(sections: dict[int, Section]) -> bool:
    """True when the lead data are coded with the default Huffman table, False when section 2
    is absent (int16 values); ``ScpError`` for tables carried in the file."""
    if 2 not in sections:
        return False
    body = sections[2].body
    if len(body) < 2 or int.from_bytes(body[:2], "little") != DEFAULT_HUFFMAN:
        raise ScpError("Huffman tables carried in the file are not supported (only the default)")
    return True


def _raw_values(data: bytes, n: int) -> np.ndarray:
    if len(data) < 2 * n:
        raise ScpError(f"lead data end after {len(data) // 2} of {n} samples (truncated)")
    return np.frombuffer(data, dtype="<i2", count=n).astype(np.int64)


def _signal(rel: str, sections: dict[int, Section], opts: ReadOptions) -> tuple:
    """(float32 mV signal (leads, samples), rate in Hz, lead names) of sections 2, 3 and 6."""
    for needed, what in ((3, "lead definitions"), (6, "rhythm data")):
        if needed not in sections:
            raise ScpError(f"no section {needed} ({what})")
    defs = leads(sections[3].body)
    if defs.reference_beat_subtracted:
        raise ScpError("reference beat subtraction (sections 4 and 5) is not supported")
    if len({(a, b) for a, b, _ in defs.ranges}) != 1:
        raise ScpError("leads cover different sample ranges (not recorded together): unsupported")
    first, last, _ = defs.ranges[0]
    if first < 1 or last < first:
        raise ScpError("section 3: empty or inverted sample range")
    n = last - first + 1
    rhythm = rhythm_header(sections[6].body, len(defs.ranges))
    if rhythm.bimodal:
        raise ScpError("bimodal compression (section 6) is not supported")
    if rhythm.interval_us == 0 or rhythm.avm_nv == 0:
        raise ScpError("section 6: sample interval or amplitude multiplier is 0")
    fs = 1e6 / rhythm.interval_us
    check_length(rel, fs, n, opts)
    coded = _huffman_coded(sections)
    signal = np.empty((len(defs.ranges), n), dtype=np.float32)
    for row, data in enumerate(lead_data(sections[6].body, rhythm)):
        values = decode(data, n) if coded else _raw_values(data, n)
        signal[row] = undifference(values, rhythm.difference) * (rhythm.avm_nv * 1e-6)
    return signal, fs, [lead_name(lead_id) for *_, lead_id in defs.ranges]


def read_record(src: Path, rel: str, opts: ReadOptions | None = None) -> RawRecord:
    """Read the SCP-ECG file ``rel`` below ``src`` (the rules of the module docstring)."""
    opts = opts or DEFAULT_OPTIONS
    sections = _sections(src, rel, opts)
    try:
        signal, fs, names = _signal(rel, sections, opts)
        tags = patient_tags(sections[1].body) if 1 in sections else {}
    except ScpError as e:
        raise RecordError(rel, str(e)) from None
    patient, sex, age, dates = patient_fields(tags)
    return file_record(
        SOURCE,
        rel,
        signal=signal,
        fs=fs,
        lead_names=names,
        patient_id=patient,
        age=safe_age(age) if age is not None else age_from_dates(*dates),
        sex=sex,
    )
