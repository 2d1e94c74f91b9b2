"""Read and condition one WFDB record file outside any corpus: the query CLI's ``read_one``."""

from __future__ import annotations

from pathlib import Path

from ingestion.conditioning import ConditionedRecord, condition
from ingestion.readers.protocol import open_record
from ingestion.readers.record import RECORD_SUFFIXES, RecordError
from ingestion.readers.registry import reader_for_header


def read_one(path: str | Path) -> ConditionedRecord:
    """The conditioned record of one WFDB record file outside any corpus: `path` is its `.hea`
    header, its `.mat`/`.dat` signal file or the record path without extension. The reader is
    picked by the header (the CinC 2021 reader for the challenge's .mat records, else the
    generic WFDB reader). RecordError naming the header file and the reason when the record
    cannot be read or conditioned."""
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
        return condition(open_record(reader_for_header(text), hea.parent, base.name, None))
    except RecordError as e:
        raise RecordError(str(hea), e.reason) from None
