"""LUDB 1.0.1 reader (Lobachevsky University ECG database): WFDB ``.hea`` + ``.dat`` records.

Layout: ``<src>/data/<n>.hea`` (any depth works; ``n`` = 1..200), 12 leads named in lower case
(``i ... v6``, canonicalised by conditioning), 500 Hz, 10 s. Each lead has its own gain with a
baseline in parentheses (``1716(6)/mV``), which ``read_wfdb`` applies. Comments:
``#<age>: 51``, ``#<sex>: F``, then ``#<diagnoses>:`` followed by one ``#<statement>`` line per
diagnosis (``#Rhythm: Sinus rhythm.``, ``#Left anterior hemiblock.``, ...). The statements are
kept verbatim (``;``-joined) as the raw codes and mapped to the scored classes with
``ecgplat.labels.ludb_to_snomed`` (table: ``docs/labels.md``). Each subject has one record, so
``patient_id`` is None (every record is its own patient). The per-lead wave annotation files
(``.i``, ``.ii``, ...) are not read.
"""

from __future__ import annotations

from pathlib import Path

from ecgplat.labels import codes_to_multihot, ludb_to_snomed
from ingestion.readers.options import ReadOptions
from ingestion.readers.recognise import refuse_other_corpus
from ingestion.readers.record import RawRecord, comment_fields, parse_age, parse_sex
from ingestion.readers.wfdb_dir import list_records as _all_headers
from ingestion.readers.wfdb_dir import read_wfdb

SOURCE = "ludb"
_DIAGNOSES = "<diagnoses>"


def check_corpus(src: Path, listing: list[str]) -> None:
    """ValueError when ``src`` holds another corpus (``ingestion.readers.recognise``)."""
    refuse_other_corpus(SOURCE, src, listing, ("ludb",), require_own=True)


def list_records(src: Path) -> list[str]:
    """Relative paths (no extension) of every ``.hea`` under ``src``, sorted."""
    return _all_headers(src)


def diagnoses(comments: list[str]) -> list[str]:
    """The statements after the ``#<diagnoses>:`` comment, without ``#`` and trailing periods."""
    out: list[str] = []
    seen = False
    for line in comments:
        text = line.strip().lstrip("#").strip()
        if text.lower().startswith(_DIAGNOSES):
            seen = True
            text = text[len(_DIAGNOSES) :].lstrip(":").strip()
        if seen and text.rstrip(". "):
            out.append(" ".join(text.split()).rstrip(". "))
    return out


def read_record(src: Path, rel: str, opts: ReadOptions | None = None) -> RawRecord:
    """Read one LUDB record (``rel`` relative to ``src``, without extension)."""
    signal, fs, names, comments = read_wfdb(src, rel, opts)
    fields = comment_fields(comments)
    statements = diagnoses(comments)
    return RawRecord(
        source=SOURCE,
        record_id=Path(rel).name,
        path=rel,
        signal=signal,
        fs=fs,
        lead_names=names,
        patient_id=None,
        codes=statements,
        labels=codes_to_multihot(ludb_to_snomed(statements)),
        age=parse_age(fields.get("<age>")),
        sex=parse_sex(fields.get("<sex>")),
    )
