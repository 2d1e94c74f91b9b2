"""Record files and folders outside any store, read and conditioned one record at a time by the
ingest's own readers: the inputs of `ecgplat predict` (and of any caller with files in hand).

``plan_inputs(paths, opts)`` finds the records: a folder is planned exactly as ``ingest auto``
plans it (``ingestion.auto.plan_folder``: each file's reader told from its content, a WFDB
record's signal and annotation files belonging to its header, other files "unrecognised
format"); a file is detected alone, and a WFDB ``.mat``/``.dat`` given beside its ``.hea`` stands
for that record. Numpy arrays (``ingest numpy``'s reader: ``--fs`` needed) whose lead names
are not given (``ReadOptions.leads``) are taken as the 12 leads in canonical order I..V6.
``read_inputs(plan)`` then yields an ``InputRecord`` per record, in key order:
the segments of ``ingestion.conditioning.condition`` (the ingest's conditioning, ``--filter``
included) as float32 mV exactly as the store returns them (``ecgplat.store.to_millivolts``), or
the one-line reason it could not be read. It never raises for a bad file.

A record's ``key`` is its file's path relative to the folder the inputs share (the input
folder itself when there is one, a lone file's folder): a WFDB record by its ``.hea``. Where
the reader knows the record's raw patient identifier (from the file, or a reader's
``patient_hint`` for a file it could not read), every standalone occurrence of it in any key and
reason is replaced by a pseudonym under a secret drawn for the plan (``InputPlan.redact``):
records of one patient share it within one run, and nothing links it to the identifier or to a
store.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ecgplat.leads import LEADS
from ecgplat.printable import one_line
from ecgplat.privacy import pseudonymise
from ecgplat.store import to_millivolts
from ecgplat.store.writer import redact
from ingestion.auto import WFDB_READERS, group_options, plan_folder, record_paths
from ingestion.conditioning import condition
from ingestion.readers.detect import UNRECOGNISED, detect
from ingestion.readers.options import DEFAULT_OPTIONS, READER_FIELDS, ReadOptions, inside_src
from ingestion.readers.protocol import (
    check_reader_options,
    open_record,
    patient_hint,
    reader_options,
)
from ingestion.readers.record import RECORD_SUFFIXES, RecordError
from ingestion.readers.registry import READERS


@dataclass(frozen=True)
class PlannedRecord:
    """One record to read: its key, and the reader and record path that read it, or the reason
    it cannot be read (an unrecognised file, one refused by the path policy or the options)."""

    key: str
    reader: str | None
    src: Path
    rel: str
    reason: str = ""


@dataclass
class InputPlan:
    """The records found under the inputs, sorted by key, with the options they are read by,
    and the raw patient ids met while reading them (each with its pseudonym for this run)."""

    records: list[PlannedRecord]
    opts: ReadOptions
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    seen: dict[str, str] = field(default_factory=dict, repr=False)  # raw id -> pseudonym

    def __len__(self) -> int:
        return len(self.records)

    def meet(self, raw_id: str | None) -> None:
        """Remember a raw patient id read from a file, for ``redact``."""
        raw = "" if raw_id is None else str(raw_id).strip()
        if raw and raw not in self.seen:
            self.seen[raw] = pseudonymise(raw, self.secret)

    def redact(self, text: str) -> str:
        """``text`` with every standalone occurrence of every raw id met so far replaced by its
        pseudonym (``ecgplat.store.writer.redact``'s rule). A caller that holds all rows
        redacts them again after the last record: a folder named after a patient may come
        before the record that tells the id."""
        if not self.seen:
            return text
        out = _TOKEN.sub(lambda m: self.seen.get(m.group(0), m.group(0)), text)
        for raw, key in self.seen.items():
            if not _TOKEN.fullmatch(raw):  # ids with separators: one pattern each
                out = redact(out, raw, key)
        return out


_TOKEN = re.compile(r"[A-Za-z0-9]+")


@dataclass
class InputRecord:
    """A record read from the inputs: ``segments`` float32 (S, 12, 2500) mV and ``lead_mask``
    bool (12,), or ``error`` (one line, never a raw patient identifier) with both None."""

    key: str
    segments: np.ndarray | None
    lead_mask: np.ndarray | None
    error: str = ""
    source: str = ""  # the reader that read it ("" when none could)


def _root(path: Path) -> str:
    return os.path.abspath(path if path.is_dir() else path.parent)


def _file_record(path: Path, base: str, opts: ReadOptions) -> PlannedRecord:
    """The record of one input file: by the reader its content needs."""
    folder, name = path.parent, path.name
    key = os.path.relpath(os.path.abspath(path), base).replace(os.sep, "/")
    if path.suffix.lower() in RECORD_SUFFIXES[1:] and path.with_suffix(".hea").is_file():
        return _file_record(path.with_suffix(".hea"), base, opts)  # a WFDB signal file
    try:
        inside_src(folder, name, name, opts)
        reader = detect(path)
    except RecordError as e:
        return PlannedRecord(key, None, folder, name, e.reason)
    except OSError as e:
        return PlannedRecord(key, None, folder, name, f"unreadable file ({type(e).__name__})")
    if reader is None:
        return PlannedRecord(key, None, folder, name, UNRECOGNISED)
    rel = name[: -len(".hea")] if reader in WFDB_READERS else name
    return PlannedRecord(key, reader, folder, rel)


def _folder_records(src: Path, base: str, opts: ReadOptions) -> list[PlannedRecord]:
    """The records of one input folder, planned as ``ingest auto`` plans it."""
    plan = plan_folder(src, opts)

    def key(rel: str) -> str:
        return os.path.relpath(os.path.join(os.path.abspath(src), rel), base).replace(os.sep, "/")

    out = [PlannedRecord(key(f), None, src, f, reason) for f, reason in plan.rejects]
    for name, files in plan.groups.items():
        if name not in READERS:
            out += [
                PlannedRecord(key(f), None, src, f, f"no reader for {name} files") for f in files
            ]
            continue
        rels = record_paths(name, src, files)
        out += [PlannedRecord(key(f), name, src, r) for f, r in zip(files, rels, strict=True)]
    return out


def plan_inputs(paths: Sequence[str | os.PathLike], opts: ReadOptions | None = None) -> InputPlan:
    """The records of the input files and folders (module docstring), each once, sorted by key.
    FileNotFoundError for an input that does not exist; ValueError for no inputs, or for a
    reader option (``--fs`` ...) that no reader of the files found takes. A record whose reader
    refuses the options (numpy arrays without ``--fs``) is planned with that reason."""
    opts = opts or DEFAULT_OPTIONS
    inputs = [Path(p) for p in paths]
    if not inputs:
        raise ValueError("no input files or folders")
    for p in inputs:
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
    base = os.path.commonpath([_root(p) for p in inputs])
    found: dict[tuple, PlannedRecord] = {}
    for p in inputs:
        records = _folder_records(p, base, opts) if p.is_dir() else [_file_record(p, base, opts)]
        for rec in records:  # a record given twice (a file and its folder) is read once
            found.setdefault((rec.key, rec.reader), rec)
    records = sorted(found.values(), key=lambda r: r.key)
    readers = {r.reader for r in records if r.reader is not None}
    taken = {k for name in readers for k in reader_options(READERS[name])}
    unused = [k for k in READER_FIELDS if getattr(opts, k) is not None and k not in taken]
    if unused:
        flags = ", ".join(f"--{k}" for k in unused)
        raise ValueError(
            f"{flags} does not apply to the readers of the files found "
            f"({', '.join(sorted(readers)) or 'none'})"
        )
    if opts.leads is None and "numpy" in readers:
        opts = dataclasses.replace(opts, leads=",".join(LEADS))
    refused: dict[str, str] = {}
    for name in readers:
        try:
            check_reader_options(READERS[name], group_options(name, opts))
        except ValueError as e:
            refused[name] = str(e)
    records = [
        dataclasses.replace(r, reader=None, reason=refused[r.reader]) if r.reader in refused else r
        for r in records
    ]
    return InputPlan(records, opts)


def _hint(plan: InputPlan, rec: PlannedRecord) -> str | None:
    if rec.reader is None:
        return None
    try:
        return patient_hint(READERS[rec.reader], rec.src, rec.rel, plan.opts)
    except Exception:  # noqa: BLE001 - a hint only
        return None


def read_record(plan: InputPlan, rec: PlannedRecord) -> InputRecord:
    """One planned record read and conditioned, or its reason (never raises for a bad file).
    An unexpected exception contributes its type only: its text may quote field values."""
    if rec.reader is None:
        return InputRecord(plan.redact(rec.key), None, None, one_line(plan.redact(rec.reason)))
    reader = READERS[rec.reader]
    opts = group_options(rec.reader, plan.opts)
    try:
        cond = condition(open_record(reader, rec.src, rec.rel, opts), opts)
    except RecordError as e:
        reason = e.reason
    except MemoryError:
        reason = "out of memory reading the record"
    except Exception as e:  # noqa: BLE001 - a reader bug must not stop the run either
        reason = f"unexpected {type(e).__name__} while reading the record"
    else:
        plan.meet(cond.patient_id)
        key = plan.redact(rec.key)
        return InputRecord(key, to_millivolts(cond.segments), cond.lead_mask, "", reader.SOURCE)
    plan.meet(_hint(plan, rec))
    return InputRecord(plan.redact(rec.key), None, None, one_line(plan.redact(reason)))


def read_inputs(plan: InputPlan) -> Iterator[InputRecord]:
    """Every planned record, read and conditioned in key order (``read_record``)."""
    for rec in plan.records:
        yield read_record(plan, rec)
