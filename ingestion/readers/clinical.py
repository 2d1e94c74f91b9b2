"""What the vendor-format readers share: safe XML parsing, and the few patient fields they keep.

The hospital exports (GE MUSE, Philips, HL7 aECG, DICOM, SCP-ECG, EDF) carry identifying data next
to the signal. Their readers work by allow-list: they read only the fields named here (the patient
identifier, which the store turns into its keyed pseudonym; sex; age) and never copy any other
field into a record, a reason or a log. Age is kept in whole years and capped at ``MAX_AGE``
(HIPAA Safe Harbor); when a file gives a birth date and an acquisition date instead, it is
computed from the two and the dates themselves are dropped.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections.abc import Callable, Collection
from pathlib import Path, PurePosixPath

from ingestion.readers.options import ReadOptions, inside_src
from ingestion.readers.record import RawRecord, RecordError

MAX_AGE = 90  # Safe Harbor: ages over 89 are aggregated into one category
MAX_XML_BYTES = 64 * 1024 * 1024  # larger vendor XML files are refused before parsing


def safe_age(years: float | None) -> float:
    """An age in whole years, capped at ``MAX_AGE``; NaN when unknown or implausible (< 0)."""
    if years is None or not math.isfinite(years) or years < 0:
        return math.nan
    return float(min(int(years), MAX_AGE))


def age_from_dates(birth: _dt.date | None, acquired: _dt.date | None) -> float:
    """Completed years between a birth date and an acquisition date, capped (``safe_age``)."""
    if birth is None or acquired is None or acquired < birth:
        return math.nan
    years = acquired.year - birth.year - ((acquired.month, acquired.day) < (birth.month, birth.day))
    return safe_age(years)


def compact_date(value: str | None) -> _dt.date | None:
    """The date of a compact ``YYYYMMDD[hhmmss...]`` value (HL7 TS, DICOM DA and DT); None
    unless it gives a valid day."""
    text = str(value or "").strip()
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        return _dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def parse_xml(data: bytes, rel: str):
    """The root element of a vendor XML document, parsed by defusedxml: entity declarations
    (billion laughs), external entities and DTD retrieval are refused with a ``RecordError``
    naming ``rel``, never resolved. The DOCTYPE line itself (MUSE's ``restecg.dtd``) is allowed
    but never fetched."""
    from xml.etree.ElementTree import ParseError

    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import fromstring

    if len(data) > MAX_XML_BYTES:
        raise RecordError(rel, f"XML file of {len(data)} bytes exceeds {MAX_XML_BYTES}")
    try:
        return fromstring(data, forbid_dtd=False, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as e:
        raise RecordError(rel, f"unsafe XML refused: {type(e).__name__}") from None
    except ParseError as e:
        raise RecordError(rel, f"not well-formed XML: {e}") from None


def local_name(tag: str) -> str:
    """An element's tag without its ``{namespace}``."""
    return tag.rpartition("}")[2]


# --- finding vendor XML files by content ------------------------------------------------------

SNIFF_BYTES = 4096  # the head of a file read to find its root element
_BOMS = (
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
    (b"<\x00", "utf-16-le"),
    (b"\x00<", "utf-16-be"),
)
_PROLOG = re.compile(r"\s*(?:<\?.*?\?>|<!--.*?-->|<!DOCTYPE[^\[>]*(?:\[.*?\])?\s*>)", re.S)
_START_TAG = re.compile(r"\s*<(?:([A-Za-z_][\w.\-]*):)?([A-Za-z_][\w.\-]*)([^>]*)>", re.S)
_XMLNS = re.compile(r"xmlns(?::([\w.\-]+))?\s*=\s*([\"'])(.*?)\2", re.S)


def xml_root(head: bytes) -> str | None:
    """The root element of an XML document as ``{namespace}name`` (``name`` without a namespace)
    from the first bytes of the file (BOM or UTF-16 detected), or None when they do not start an
    XML document. Text only: nothing is parsed, resolved or fetched."""
    codec = next((c for bom, c in _BOMS if head.startswith(bom)), "latin-1")
    if codec.startswith("utf-16"):
        head = head[: len(head) // 2 * 2]
    text = head.decode(codec, errors="replace").lstrip("\ufeff")
    pos = 0
    while m := _PROLOG.match(text, pos):
        pos = m.end()
    start = _START_TAG.match(text, pos)
    if start is None:
        return None
    prefix, name, attrs = start.groups()
    spaces = {m.group(1): m.group(3) for m in _XMLNS.finditer(attrs)}
    namespace = spaces.get(prefix)
    return f"{{{namespace}}}{name}" if namespace else name


def record_id(rel: str) -> str:
    """The record id of a one-file record: its path without the file's extension."""
    path = PurePosixPath(rel)
    return str(path.with_suffix("")) if path.suffix else rel


def file_record(source: str, rel: str, **fields) -> RawRecord:
    """The ``RawRecord`` of the one-file record ``rel`` of reader ``source`` (its id:
    ``record_id(rel)``, its path: ``rel``), with the other ``fields`` given."""
    return RawRecord(source=source, record_id=record_id(rel), path=rel, **fields)


def source_root(src: Path) -> Path:
    """The folder record paths are relative to: ``src``, or its folder when it is one file."""
    src = Path(src)
    return src if src.is_dir() else src.parent


def list_files(
    src: Path, accept: Callable[[bytes, int], bool], head_bytes: int = SNIFF_BYTES
) -> list[str]:
    """Sorted paths relative to ``source_root(src)`` of the files (``src`` itself, or every file
    below it, hidden names skipped) for which ``accept(head, size)`` holds, ``head`` being the
    first ``head_bytes`` of the file: found by content, whatever their extension."""
    src = Path(src)
    files = [src] if src.is_file() else (p for p in src.rglob("*") if not p.name.startswith("."))
    out = []
    for path in files:
        try:
            if not path.is_file():
                continue
            with open(path, "rb") as f:
                head = f.read(head_bytes)
                size = f.seek(0, 2)
        except OSError:
            continue
        if accept(head, size):
            out.append(path.relative_to(source_root(src)).as_posix())
    return sorted(out)


def list_xml_files(src: Path, roots: Collection[str]) -> list[str]:
    """``list_files`` of the XML files whose root element (``xml_root``) is one of ``roots``."""
    return list_files(src, lambda head, _size: xml_root(head) in roots)


def load_xml(src: Path, rel: str, opts: ReadOptions | None = None):
    """The root element of the XML file ``rel`` below ``source_root(src)``: the path policy of
    ``opts`` checked, the size bounded (``MAX_XML_BYTES``) before reading, parsed by
    ``parse_xml``; ``RecordError`` naming ``rel`` otherwise."""
    return parse_xml(read_file(src, rel, opts, MAX_XML_BYTES, "XML file"), rel)


def read_file(
    src: Path, rel: str, opts: ReadOptions | None, max_bytes: int, what: str = "file"
) -> bytes:
    """The bytes of the one-file record ``rel`` below ``source_root(src)``: the path policy of
    ``opts`` checked and the size bounded by ``max_bytes`` before reading; ``RecordError``
    naming ``rel`` otherwise."""
    file = inside_src(source_root(src), rel, rel, opts)
    if not file.is_file():
        raise RecordError(rel, "file not found")
    size = file.stat().st_size
    if size > max_bytes:
        raise RecordError(rel, f"{what} of {size} bytes exceeds {max_bytes}")
    try:
        return file.read_bytes()
    except OSError as e:
        raise RecordError(rel, f"cannot read the file ({type(e).__name__})") from None


# --- lead codes shared by SCP-ECG and DICOM -----------------------------------------------------

# SCP-ECG lead identification code -> canonical lead (EN 1064; the ISO/IEEE 11073 MDC_ECG_LEAD_*
# terms, DICOM's "MDC" channel codes "2:<n>", use the same numbers)
SCP_LEAD_CODES = {
    **{1: "I", 2: "II", 3: "V1", 4: "V2", 5: "V3", 6: "V4", 7: "V5", 8: "V6"},
    **{61: "III", 62: "aVR", 63: "aVL", 64: "aVF"},
}
