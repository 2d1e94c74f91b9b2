"""CPSC 2021 (paroxysmal AF challenge) reader: WFDB ``data_<patient>_<record>`` records.

Two leads (I, II) at 200 Hz, 8 s to tens of minutes; gains are non-integer with a baseline in
parentheses (``31132.34(-166854)/mV``), which ``read_wfdb`` applies. The patient id is the
``<patient>`` part of the file name. The header comment states the rhythm class of the whole
record (``non atrial fibrillation``, ``persistent atrial fibrillation``, ``paroxysmal atrial
fibrillation``); it is kept in ``extra["rhythm"]``. Only persistent AF (AF throughout) becomes
the record-level AF code; paroxysmal episodes cover part of a record, so labelling every
segment AF would be wrong and the record gets no scored label.
"""

from __future__ import annotations

import re
from pathlib import Path

from ecgplat.labels import codes_to_multihot
from ingestion.readers.options import ReadOptions
from ingestion.readers.recognise import refuse_other_corpus
from ingestion.readers.record import RawRecord, RecordError
from ingestion.readers.wfdb_dir import read_wfdb

SOURCE = "cpsc2021"
NAME_RE = re.compile(r"^data_(?P<patient>\d+)_(?P<record>\d+)$")
_AF = "164889003"


def check_corpus(src: Path, listing: list[str]) -> None:
    """ValueError when ``src`` holds another corpus (``ingestion.readers.recognise``)."""
    refuse_other_corpus(SOURCE, src, listing, ("cpsc2021",), require_own=True)


def list_records(src: Path) -> list[str]:
    """Relative paths of every ``data_<patient>_<record>.hea`` under ``src``, sorted."""
    src = Path(src)
    return sorted(
        p.relative_to(src).with_suffix("").as_posix()
        for p in src.rglob("data_*.hea")
        if NAME_RE.match(p.stem)
    )


def patient_hint(src: Path, rel: str, opts: ReadOptions | None = None) -> str | None:
    """The raw patient number in the file name (for redacting it from a reject), or None."""
    m = NAME_RE.match(Path(rel).name)
    return m["patient"] if m else None


def read_record(src: Path, rel: str, opts: ReadOptions | None = None) -> RawRecord:
    """Read one CPSC 2021 record (``rel`` relative to ``src``, without extension)."""
    m = NAME_RE.match(Path(rel).name)
    if m is None:
        raise RecordError(rel, "file name is not data_<patient>_<record>")
    signal, fs, names, comments = read_wfdb(src, rel, opts)
    rhythm = " ".join(c.strip().lower() for c in comments if c.strip())
    codes = [_AF] if "persistent atrial fibrillation" in rhythm else []
    return RawRecord(
        source=SOURCE,
        record_id=Path(rel).name,
        path=rel,
        signal=signal,
        fs=fs,
        lead_names=names,
        patient_id=m["patient"],
        codes=codes,
        labels=codes_to_multihot(codes),
        extra={"rhythm": rhythm},
    )
