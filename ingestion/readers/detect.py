"""Which reader a file needs, told from its first few kilobytes, never from its extension alone.

``detect(path) -> reader name | None`` reads at most ``HEAD_BYTES`` of a file (an XML root may
sit up to ``XML_HEAD_BYTES`` in, behind comments and a DOCTYPE) and applies these rules, first
match wins:

- DICOM: ``DICM`` at byte 128 (after the preamble) -> ``dicom``;
- EDF/EDF+: the 256-byte header starts with version ``"0       "``, its header-size field is
  ``256 * (signals + 1)`` and its start date reads ``dd.mm.yy`` -> ``edf``;
- SCP-ECG: bytes 2-5 give the file's own length, section 0 starts at byte 6 with id 0, a length
  inside the file, and its CRC-CCITT checks -> ``scp``;
- numpy: the ``\\x93NUMPY`` magic (``.npy``) or a zip whose first member is a ``.npy`` (``.npz``)
  -> ``numpy``;
- XML (UTF-8, ISO-8859-1, or UTF-16 with or without BOM), by the root element after the prolog
  (declaration, comments, processing instructions, DOCTYPE): ``RestingECG`` -> ``muse``;
  ``restingecgdata`` or ``PhilipsECG`` -> ``philips``; ``AnnotatedECG`` in the namespace
  ``urn:hl7-org:v3`` -> ``hl7_aecg``. The prolog is scanned as text, nothing is parsed: no
  entity is expanded and no DTD fetched (the readers parse with defusedxml). When the root lies
  past the scanned head (a long internal DTD subset), the DOCTYPE's root name decides;
- WFDB: a ``.hea`` file whose first non-comment line is a record line (``name[/segments]
  signals ...``) -> ``cinc2021`` for the challenge's ``.mat`` + ``Dx:`` headers, else ``wfdb``
  (``registry.reader_for_header``). A header needs its extension: WFDB names its files by it.

Anything else is None: the auto ingest rejects it as "unrecognised format". A name is returned
whether or not its reader is registered yet; the auto ingest checks that.
"""

from __future__ import annotations

import re
from pathlib import Path

from ingestion.readers.registry import reader_for_header
from ingestion.readers.scp_sections import crc_ccitt

HEAD_BYTES = 16 * 1024
XML_HEAD_BYTES = 64 * 1024
UNRECOGNISED = "unrecognised format"

# XML root element (local name, namespace required or None) -> reader
XML_ROOTS: dict[str, tuple[str, str | None]] = {
    "RestingECG": ("muse", None),
    "restingecgdata": ("philips", None),
    "PhilipsECG": ("philips", None),
    "AnnotatedECG": ("hl7_aecg", "urn:hl7-org:v3"),
}
_PROLOG = re.compile(
    r"\s*(?:<\?.*?\?>|<!--.*?-->|<!DOCTYPE\s+[^\[>]*(?:\[.*?\]\s*)?>)",
    re.DOTALL,
)
_DOCTYPE = re.compile(r"<!DOCTYPE\s+([A-Za-z_][\w.:-]*)")
_START_TAG = re.compile(r"<([A-Za-z_][\w.-]*:)?([A-Za-z_][\w.-]*)([^>]*)", re.DOTALL)
_WFDB_NAME = re.compile(r"^[^\s/]+(/\d+)?$")
_EDF_DATE = re.compile(rb"^\d\d\.\d\d\.\d\d$")


def detect(path: str | Path) -> str | None:
    """The reader name of the file at ``path`` by the rules of the module docstring, or None.
    OSError propagates (an unreadable file is the caller's reject)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
        size = f.seek(0, 2)
    for rule in (_dicom, _edf, _scp, _numpy):
        name = rule(head, size)
        if name:
            return name
    if _xml_text(head) is not None:  # an XML root may sit behind a long prolog
        return xml_reader(head if len(head) < HEAD_BYTES else _more(path))
    if path.suffix.lower() == ".hea":
        return _wfdb(head)
    return None


def _more(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(XML_HEAD_BYTES)


def _dicom(head: bytes, size: int) -> str | None:
    return "dicom" if head[128:132] == b"DICM" else None


def _edf(head: bytes, size: int) -> str | None:
    if len(head) < 256 or head[:8] != b"0       ":
        return None
    try:
        header_bytes = int(head[184:192].strip())
        signals = int(head[252:256].strip())
    except ValueError:
        return None
    ok = signals > 0 and header_bytes == 256 * (signals + 1) and _EDF_DATE.match(head[168:176])
    return "edf" if ok else None


def _scp(head: bytes, size: int) -> str | None:
    if len(head) < 22 or int.from_bytes(head[2:6], "little") != size:
        return None
    section_id = int.from_bytes(head[8:10], "little")
    length = int.from_bytes(head[10:14], "little")
    if section_id != 0 or not 16 <= length <= min(size - 6, len(head) - 6):
        return None
    stored = int.from_bytes(head[6:8], "little")
    return "scp" if crc_ccitt(head[8 : 6 + length]) == stored else None


def _numpy(head: bytes, size: int) -> str | None:
    if head.startswith(b"\x93NUMPY"):
        return "numpy"
    if head.startswith(b"PK\x03\x04") and len(head) >= 30:
        n = int.from_bytes(head[26:28], "little")
        name = head[30 : 30 + n]
        return "numpy" if name.endswith(b".npy") else None
    return None


def _xml_text(head: bytes) -> str | None:
    """The head decoded for scanning its markup, or None when it does not start like XML."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        codec = "utf-16"
    elif head.startswith(b"<\x00"):
        codec = "utf-16-le"
    elif head.startswith(b"\x00<"):
        codec = "utf-16-be"
    else:
        codec = "latin-1"  # the markup is ASCII in UTF-8 and ISO-8859-1 alike
        head = head.removeprefix(b"\xef\xbb\xbf")
    if codec.startswith("utf-16"):
        head = head[: len(head) // 2 * 2]
    text = head.decode(codec, errors="replace")
    return text if text.lstrip().startswith("<") else None


def xml_reader(head: bytes) -> str | None:
    """The reader of an XML document from its first bytes (root element and namespace)."""
    text = _xml_text(head)
    if text is None:
        return None
    pos, doctype = 0, None
    while (m := _PROLOG.match(text, pos)) and m.end() > pos:
        found = _DOCTYPE.search(m.group())
        doctype = found.group(1) if found else doctype
        pos = m.end()
    tag = _START_TAG.match(text, len(text) - len(text[pos:].lstrip()))
    if tag is None:  # the root lies past the head: the DOCTYPE's name is the root's
        entry = XML_ROOTS.get(doctype.rpartition(":")[2]) if doctype else None
        return entry[0] if entry and entry[1] is None else None
    prefix, local, attrs = (tag.group(1) or "").rstrip(":"), tag.group(2), tag.group(3)
    entry = XML_ROOTS.get(local)
    if entry is None:
        return None
    reader, namespace = entry
    if namespace is None:
        return reader
    attr = f"xmlns:{prefix}" if prefix else "xmlns"
    declared = re.search(rf"{re.escape(attr)}\s*=\s*[\"']([^\"']*)[\"']", attrs)
    return reader if declared and declared.group(1) == namespace else None


def _wfdb(head: bytes) -> str | None:
    text = head.decode("utf-8", errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    body = [ln.split() for ln in lines if not ln.startswith("#")]
    if not body or len(body[0]) < 2 or not _WFDB_NAME.match(body[0][0]):
        return None
    if not body[0][1].isdigit():
        return None
    return reader_for_header(text).SOURCE
