"""The SCP-ECG (EN 1064) record structure, decoded from the standard: CRC, sections, Huffman data.

Our own decoder (no maintained Python library exists), written from EN 1064 (protocol versions
1.x and 2.x) and checked against the same recording exported as HL7 aECG and DICOM
(``tests/test_reader_scp_edf.py``). A record is

- bytes 0-1: the CRC-CCITT (polynomial 0x1021, initial 0xFFFF) of every byte after them;
  bytes 2-5: the record's length (uint32), which must be the file's size;
- sections, each with a 16-byte header: CRC-CCITT of the rest of the section (uint16), section
  id (uint16), section length including the header (uint32), section version, protocol version
  and 6 reserved bytes. Section 0 (at byte 6) points at the others: 10 bytes per section (id,
  length, 1-based byte index; length 0 = absent).

Every length and index is checked against the file's size before anything is allocated from it;
every CRC must match (a mismatch is refused, not warned). ``ScpError`` carries a one-line reason
that names no value of the file. The sections a reader needs are decoded here: 1 (the allow-listed
patient tags, nothing else), 2 (Huffman tables: only the default table, 19999, is supported), 3
(lead definitions) and 6 (rhythm data: Huffman codes, then first or second differences undone).
"""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass

import numpy as np

HEADER = 16  # bytes of a section header
POINTER = 10  # bytes of one section-0 pointer
PROTOCOLS = range(10, 30)  # protocol version bytes of 1.x (10-13) and 2.x (20-29)
DEFAULT_HUFFMAN = 19999  # section 2's table count meaning "the default table of the standard"
# section 1 tags read (every other tag is skipped unread): patient id, age, birth date, sex,
# acquisition date
TAG_PATIENT_ID, TAG_AGE, TAG_BIRTH, TAG_SEX, TAG_ACQUIRED = 2, 4, 5, 8, 25
ALLOWED_TAGS = frozenset({TAG_PATIENT_ID, TAG_AGE, TAG_BIRTH, TAG_SEX, TAG_ACQUIRED})
# section 3 lead ids (EN 1064 table of lead identifiers) of the 12 standard leads
LEAD_IDS = {1: "I", 2: "II", 3: "V1", 4: "V2", 5: "V3", 6: "V4", 7: "V5", 8: "V6"}
LEAD_IDS.update({61: "III", 62: "aVR", 63: "aVL", 64: "aVF"})
# tag 4 age units -> units per year (0 = unspecified)
AGE_UNITS = {1: 1.0, 2: 12.0, 3: 52.1775, 4: 365.25, 5: 8766.0}


class ScpError(ValueError):
    """A record that does not decode; the message is a one-line reason without file values."""


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC_TABLE = _crc_table()


def crc_ccitt(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-CCITT (polynomial 0x1021, initial 0xFFFF, no reflection) as SCP-ECG uses it."""
    table = _CRC_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ byte]
    return crc


def looks_like_scp(head: bytes, size: int) -> bool:
    """Whether a file of ``size`` bytes starting with ``head`` (32 bytes or more) is laid out as
    an SCP-ECG record: section 0 at byte 6, its length a whole number of pointers, its first
    pointer naming itself at index 7. The record length is not compared with ``size`` (a
    truncated record is listed, then rejected with its reason)."""
    if len(head) < HEADER + 6 + POINTER or size < len(head):
        return False
    section_id, length = struct.unpack_from("<HI", head, 8)
    first_id, first_len, first_index = struct.unpack_from("<HII", head, 6 + HEADER)
    return (
        section_id == 0
        and length >= HEADER + POINTER
        and (length - HEADER) % POINTER == 0
        and (first_id, first_len, first_index) == (0, length, 7)
    )


@dataclass(frozen=True)
class Section:
    """One section: its id, protocol version byte and the bytes after its header."""

    id: int
    protocol: int
    body: bytes


def _header(data: bytes, start: int, what: str) -> tuple[int, int, int, int]:
    """(crc, id, length, protocol) of the section header at ``start``, its length checked."""
    if start + HEADER > len(data):
        raise ScpError(f"truncated: {what} header lies past the end of the file")
    crc, section_id, length, _version, protocol = struct.unpack_from("<HHIBB", data, start)
    if length < HEADER:
        raise ScpError(f"{what} is shorter than its own header")
    if start + length > len(data):
        raise ScpError(f"{what} length points past the end of the file (truncated or corrupt)")
    return crc, section_id, length, protocol


def _checked(data: bytes, start: int, section_id: int, length: int) -> Section:
    crc, found, declared, protocol = _header(data, start, f"section {section_id}")
    if found != section_id or declared != length:
        raise ScpError(f"section {section_id}: header disagrees with the section-0 pointer")
    if crc_ccitt(data[start + 2 : start + length]) != crc:
        raise ScpError(f"section {section_id}: CRC mismatch (corrupt file)")
    return Section(section_id, protocol, data[start + HEADER : start + length])


def parse_record(data: bytes) -> dict[int, Section]:
    """The record's sections by id, after checking the record length and CRC, section 0's
    pointers and every section's bounds and CRC (``ScpError`` otherwise)."""
    if len(data) < 6 + HEADER:
        raise ScpError("truncated: shorter than an SCP-ECG record header")
    crc, declared = struct.unpack_from("<HI", data, 0)
    if declared > len(data):
        raise ScpError(f"truncated: record declares {declared} bytes, the file has {len(data)}")
    if declared != len(data):
        raise ScpError(f"record declares {declared} bytes but the file has {len(data)}")
    if crc_ccitt(data[2:]) != crc:
        raise ScpError("record CRC mismatch (corrupt file)")
    _crc, section_id, length, _protocol = _header(data, 6, "section 0")
    if section_id != 0 or (length - HEADER) % POINTER:
        raise ScpError("not an SCP-ECG record: no section 0 at byte 6")
    sections = {0: _checked(data, 6, 0, length)}
    body = sections[0].body
    for offset in range(0, len(body), POINTER):
        sid, slen, index = struct.unpack_from("<HII", body, offset)
        if slen == 0 or sid == 0:
            continue
        if index < 1 or index - 1 + slen > len(data):
            raise ScpError(f"section {sid} length points past the end of the file")
        if sid in sections:
            raise ScpError(f"section {sid} is listed twice")
        sections[sid] = _checked(data, index - 1, sid, slen)
    if sections[0].protocol not in PROTOCOLS:
        v = sections[0].protocol
        raise ScpError(f"SCP-ECG protocol version {v // 10}.{v % 10} is not supported (1.x, 2.x)")
    return sections


# --- section 1: the allow-listed patient tags -------------------------------------------------


def _date(value: bytes) -> dt.date | None:
    if len(value) < 4:
        return None
    year, month, day = struct.unpack_from("<HBB", value)
    try:
        return dt.date(year, month, day)
    except ValueError:  # 0 fields mean "not given"
        return None


def patient_tags(body: bytes) -> dict[int, bytes]:
    """The values of the ``ALLOWED_TAGS`` of section 1 (tag, uint16 length, value; 255 ends);
    every other tag is skipped unread. ``ScpError`` when a tag runs past the section."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 3 <= len(body):
        tag, length = struct.unpack_from("<BH", body, pos)
        if tag == 255:
            break
        if pos + 3 + length > len(body):
            raise ScpError("section 1: a tag runs past the end of the section")
        if tag in ALLOWED_TAGS:
            out.setdefault(tag, body[pos + 3 : pos + 3 + length])
        pos += 3 + length
    return out


def patient_fields(tags: dict[int, bytes]) -> tuple[str | None, str, float | None, tuple]:
    """(raw patient id or None, sex "M"/"F"/"", age in years or None, (birth, acquired) dates)
    from ``patient_tags``; the caller turns the age or dates into a whole capped age."""
    text = tags.get(TAG_PATIENT_ID, b"").split(b"\0", 1)[0].decode("latin-1").strip()
    sex = {1: "M", 2: "F"}.get(tags.get(TAG_SEX, b"\0")[0] if tags.get(TAG_SEX) else 0, "")
    age = None
    raw_age = tags.get(TAG_AGE, b"")
    if len(raw_age) >= 3:
        value, unit = struct.unpack_from("<HB", raw_age)
        if unit in AGE_UNITS:
            age = value / AGE_UNITS[unit]
    dates = (_date(tags.get(TAG_BIRTH, b"")), _date(tags.get(TAG_ACQUIRED, b"")))
    return text or None, sex, age, dates


# --- sections 3 and 6: leads and rhythm data --------------------------------------------------


@dataclass(frozen=True)
class Leads:
    """Section 3: each lead's 1-based first and last sample and its lead id, and the flags."""

    ranges: list[tuple[int, int, int]]
    reference_beat_subtracted: bool


def leads(body: bytes) -> Leads:
    """Section 3's lead definitions (``ScpError`` when they run past the section)."""
    if len(body) < 2:
        raise ScpError("section 3 is too short")
    count, flags = body[0], body[1]
    if count == 0:
        raise ScpError("section 3 defines no lead")
    if 2 + 9 * count > len(body):
        raise ScpError("section 3: lead definitions run past the end of the section")
    ranges = [struct.unpack_from("<IIB", body, 2 + 9 * i) for i in range(count)]
    return Leads(ranges, bool(flags & 1))


def lead_name(lead_id: int) -> str:
    """The canonical name of a section-3 lead id; ``SCP-<id>`` for leads outside the 12."""
    return LEAD_IDS.get(lead_id, f"SCP-{lead_id}")


@dataclass(frozen=True)
class Rhythm:
    """Section 6's header: amplitude multiplier (nV), sample interval (µs), difference order,
    bimodal compression, and the byte length of each lead's data."""

    avm_nv: int
    interval_us: int
    difference: int
    bimodal: bool
    lengths: list[int]


def rhythm_header(body: bytes, n_leads: int) -> Rhythm:
    """Section 6's header for ``n_leads`` leads; ``ScpError`` when the lead data it declares
    exceed the section."""
    if len(body) < 6 + 2 * n_leads:
        raise ScpError("section 6 is too short for its lead table")
    avm, interval, difference, bimodal = struct.unpack_from("<HHBB", body)
    lengths = list(struct.unpack_from(f"<{n_leads}H", body, 6))
    if 6 + 2 * n_leads + sum(lengths) > len(body):
        raise ScpError("section 6: lead data lengths run past the end of the section")
    return Rhythm(avm, interval, difference, bool(bimodal), lengths)


def lead_data(body: bytes, rhythm: Rhythm) -> list[bytes]:
    """Each lead's encoded bytes from section 6 (after ``rhythm_header``)."""
    out, pos = [], 6 + 2 * len(rhythm.lengths)
    for n in rhythm.lengths:
        out.append(body[pos : pos + n])
        pos += n
    return out


def undifference(d: np.ndarray, order: int) -> np.ndarray:
    """Samples (int64) from their encoding: 0 the values, 1 first differences (x[n] = d[n] +
    x[n-1]), 2 second differences (x[0], x[1] as given, x[n] = d[n] + 2 x[n-1] - x[n-2])."""
    x = d.astype(np.int64)
    if order == 0 or len(x) == 0:
        return x
    if order == 1:
        return np.cumsum(x)
    if order != 2:
        raise ScpError(f"section 6: unknown difference encoding {order}")
    if len(x) < 2:
        return x
    steps = np.cumsum(np.concatenate(([x[1] - x[0]], x[2:])))  # x[n] - x[n-1], n >= 1
    return np.concatenate(([x[0]], x[0] + np.cumsum(steps)))
