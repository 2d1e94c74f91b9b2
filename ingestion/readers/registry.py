"""Registry of corpus readers (source name -> module with ``list_records`` and ``read_record``),
and ``read_one``: one record file outside a corpus, read by the reader its format needs."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ingestion.readers import cinc2021, code15, cpsc2021, ludb, numpy_arrays, ptbxl, wfdb_dir
from ingestion.readers.record import RECORD_SUFFIXES, RecordError

CORPORA: dict[str, ModuleType] = {
    "cinc2021": cinc2021,
    "ptbxl": ptbxl,
    "wfdb": wfdb_dir,
    "cpsc2021": cpsc2021,
    "ludb": ludb,
    "code15": code15,
    "numpy": numpy_arrays,
}


def get_corpus(name: str) -> ModuleType:
    """The reader module for ``name``; ValueError listing the known corpora otherwise."""
    try:
        return CORPORA[name]
    except KeyError:
        raise ValueError(f"unknown corpus {name!r} (known: {', '.join(CORPORA)})") from None


def _reader_of_header(text: str) -> ModuleType:
    """cinc2021 for the challenge's format (every signal line names a .mat file and a `Dx:`
    comment holds the labels), else the generic WFDB reader (which reads other .mat records,
    e.g. with non-ECG channels, through wfdb)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    body = [ln.split() for ln in lines if not ln.startswith("#")]
    files = [tok[0] for tok in body[1:]]
    has_dx = any(ln.lstrip("# ").lower().startswith("dx:") for ln in lines if ln.startswith("#"))
    if files and has_dx and all(f.lower().endswith(".mat") for f in files):
        return cinc2021
    return wfdb_dir


def read_one(path: str | Path):
    """The conditioned record (`ingestion.conditioning.ConditionedRecord`) of one WFDB record
    file outside any corpus: `path` is its `.hea` header, its `.mat`/`.dat` signal file or the
    record path without extension. The reader is picked by the header (the CinC 2021 reader for
    the challenge's .mat records, else the generic WFDB reader). RecordError naming the header
    file and the reason when the record cannot be read or conditioned."""
    from ingestion.conditioning import condition

    path = Path(path)
    base = path.with_suffix("") if path.suffix.lower() in RECORD_SUFFIXES else path
    hea = base.with_name(base.name + ".hea")
    try:
        text = hea.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise RecordError(str(path), "no WFDB header (.hea) for this record") from None
    except OSError as e:
        raise RecordError(str(hea), f"cannot read the header: {e.strerror or e}") from None
    try:
        return condition(_reader_of_header(text).read_record(hea.parent, base.name))
    except RecordError as e:
        raise RecordError(str(hea), e.reason) from None
