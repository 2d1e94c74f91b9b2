"""Which known corpus a source folder holds, told from its listing and one or two headers.

The readers' ``check_corpus`` (``ingestion.readers.protocol``) use it to refuse another corpus's
folder before an ingest stores anything: ``ingest ludb`` on a CinC 2021 folder would store its
records without labels, age or sex. Evidence, cheapest first: ``ptbxl_database.csv`` at the
root (PTB-XL); every listed name ``data_<patient>_<record>`` (CPSC 2021); the comments and
signal files of the first and last listed headers (CODE-15%: ``# Exam ID`` / ``# Chagas label``;
LUDB: ``#<age>`` / ``#<diagnoses>``; CinC 2021: ``.mat`` signal files with a ``Dx`` comment);
array files and no header (numpy). A header that cannot be read or parsed is no evidence: the
reader rejects that record with its reason. Messages name the folder and the evidence, never a
file name (CPSC 2021's hold patient ids).
"""

from __future__ import annotations

import re
from pathlib import Path

from ingestion.readers.record import RecordError, comment_fields
from ingestion.readers.wfdb_header import parse_header

NAMES = {
    "cinc2021": "CinC 2021",
    "ptbxl": "PTB-XL",
    "code15": "CODE-15%",
    "ludb": "LUDB",
    "cpsc2021": "CPSC 2021",
    "wfdb": "generic WFDB",
    "mat": "generic WFDB (.mat signals)",
    "numpy": "numpy array",
}
EVIDENCE = {
    "cinc2021": "its headers name .mat signal files and carry Dx comments",
    "ptbxl": "it holds ptbxl_database.csv",
    "code15": "its headers carry CODE-15%'s Exam ID / Chagas label comments",
    "ludb": "its headers carry LUDB's <age> / <diagnoses> comments",
    "cpsc2021": "its records are all named data_<patient>_<record>",
    "wfdb": "its headers name .dat signal files without any corpus's comments",
    "mat": "its headers name .mat signal files without Dx comments",
    "numpy": "it holds .npy/.npz arrays and no WFDB header",
}
WFDB_KINDS = ("wfdb", "mat", "cinc2021", "ptbxl", "code15", "ludb", "cpsc2021")  # WFDB folders
_CPSC_NAME = re.compile(r"^data_\d+_\d+$")
_HEADER_BYTES = 1 << 16


def header_kind(text: str) -> str | None:
    """The corpus one header text looks like (a key of ``NAMES``); None when it does not parse."""
    try:
        hdr = parse_header(text, "header")
    except RecordError:
        return None
    fields = comment_fields(hdr["comments"])
    if "exam id" in fields or "chagas label" in fields:
        return "code15"
    if "<diagnoses>" in fields or "<age>" in fields:
        return "ludb"
    files = {str(s["file"]).lower() for s in hdr["signals"]}
    if files and all(f.endswith(".mat") for f in files):
        return "cinc2021" if "dx" in fields else "mat"
    return "wfdb"


def _header_kinds(src: Path, rels: list[str]) -> set[str]:
    kinds = set()
    for rel in rels:
        hea = src / f"{rel}.hea"
        try:
            if hea.is_symlink() or not hea.is_file():
                continue
            with open(hea, "rb") as f:
                text = f.read(_HEADER_BYTES).decode("utf-8", errors="replace")
        except OSError:
            continue
        kind = header_kind(text)
        if kind is not None:
            kinds.add(kind)
    return kinds


def _some_file(src: Path, pattern: str) -> Path | None:
    try:
        return next((p for p in src.rglob(pattern) if not p.name.startswith(".")), None)
    except OSError:
        return None


def recognise(src: Path, listing: list[str]) -> set[str]:
    """The corpora (keys of ``NAMES``) the folder ``src`` looks like; ``listing`` is a reader's
    record paths (no extension) of it. Empty when nothing tells (an empty folder, unreadable
    headers)."""
    src = Path(src)
    if not src.is_dir():
        return set()
    if (src / "ptbxl_database.csv").is_file():
        return {"ptbxl"}
    headers = [rel for rel in dict.fromkeys(listing[:1] + listing[-1:])]
    if not any((src / f"{rel}.hea").is_file() for rel in headers):
        first = _some_file(src, "*.hea")
        headers = [first.relative_to(src).with_suffix("").as_posix()] if first else []
    if not headers:
        has_arrays = _some_file(src, "*.npy") or _some_file(src, "*.npz")
        return {"numpy"} if has_arrays else set()
    names = listing or headers
    if all(_CPSC_NAME.match(Path(rel).name) for rel in names):
        return {"cpsc2021"}
    return _header_kinds(src, headers)


def refuse_other_corpus(
    source: str, src: Path, listing: list[str], own: tuple[str, ...], require_own: bool
) -> None:
    """ValueError when ``src`` looks like another corpus than the reader of ``source`` reads:
    one it recognises as none of ``own`` (with ``require_own``: also a folder whose readable
    headers show none of ``own``). Nothing is refused when nothing tells."""
    kinds = recognise(src, listing)
    if not kinds or kinds & set(own):
        return
    other = sorted(kinds)[0]
    if other in ("wfdb", "mat") and not require_own:
        return
    hint = "wfdb" if other == "mat" else other
    raise ValueError(
        f"{src}: not a {NAMES[source]} folder: {EVIDENCE[other]} (a {NAMES[other]} folder; "
        f"use `ecgplat ingest {hint}`)"
    )
