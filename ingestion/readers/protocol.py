"""The contract every corpus reader module meets (``Reader``), and the checks of its optional parts.

A reader is a module (``ingestion.readers.cinc2021`` ...), not a class: the registry
(``ingestion.readers.registry``) maps each source name to its module, and the ingest sends the
name, never the module, to its Dask workers. Every reader has

- ``SOURCE``: the source name of its records (``RawRecord.source``, the store's record keys);
- ``list_records(src) -> list[str]``: the relative record paths under ``src`` (sorted; cheap,
  no signal is read);
- ``read_record(src, rel, opts=None) -> RawRecord``: one record, in float32 millivolts (or the
  unit the user opted into), raising ``RecordError`` with a one-line reason;

and may have

- ``OPTIONS``: the ``ReadOptions`` reader fields it takes (``units``, ``fs``, ``leads``,
  ``patients``); an ingest that sets any other is refused (``check_reader_options``);
- ``check_options(opts)``: ValueError for invalid values of those fields, before anything runs;
- ``patient_hint(src, rel, opts=None) -> str | None``: the raw patient id when the file name or
  metadata tells it without reading the signal (used only to redact a reject's path and reason);
- ``open_record(src, rel, opts=None) -> RawRecord``: ``read_record`` with the signal left in the
  files as a ``record.BlockSignal``, read block by block while it is conditioned (the ingest
  uses it, through ``open_record`` here, so that a long record's memory does not grow with it);
- ``check_corpus(src, listing)``: ValueError when the folder ``src`` (whose records are
  ``listing``) holds another corpus (cheap: the listing and one or two headers, see
  ``ingestion.readers.recognise``); the pipeline runs it before anything is stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ingestion.readers.options import DEFAULT_OPTIONS, READER_FIELDS, ReadOptions
from ingestion.readers.record import RawRecord


class Reader(Protocol):
    """The required part of a corpus reader module (see the module docstring)."""

    SOURCE: str

    def list_records(self, src: Path) -> list[str]: ...

    def read_record(self, src: Path, rel: str, opts: ReadOptions | None = None) -> RawRecord: ...


def reader_options(reader: Reader) -> tuple[str, ...]:
    """The ``ReadOptions`` reader fields ``reader`` takes (its ``OPTIONS``; none by default)."""
    return tuple(getattr(reader, "OPTIONS", ()))


def patient_hint(reader: Reader, src: Path, rel: str, opts: ReadOptions | None) -> str | None:
    """The raw patient id of record ``rel`` told by ``reader.patient_hint``; None when the
    reader has no such hint (exceptions of the hint itself propagate)."""
    hint = getattr(reader, "patient_hint", None)
    return None if hint is None else hint(src, rel, opts)


def open_record(reader: Reader, src: Path, rel: str, opts: ReadOptions | None) -> RawRecord:
    """Record ``rel`` by ``reader.open_record`` (signal read in blocks while conditioned) where
    the reader has one, else by ``reader.read_record``."""
    opener = getattr(reader, "open_record", None)
    return (opener or reader.read_record)(src, rel, opts)


def check_corpus(reader: Reader, src: Path, listing: list[str]) -> None:
    """``reader.check_corpus(src, listing)`` where the reader has one: ValueError naming the
    folder when it holds another corpus than ``reader`` reads."""
    check = getattr(reader, "check_corpus", None)
    if check is not None:
        check(Path(src), listing)


def check_reader_options(reader: Reader, opts: ReadOptions | None) -> ReadOptions:
    """``opts`` (default: the defaults) after checking that every reader field it sets is one
    ``reader`` takes (its ``OPTIONS``) and, where the reader has ``check_options``, that the
    values are valid. ValueError naming the option otherwise (before anything runs)."""
    opts = opts or DEFAULT_OPTIONS
    allowed = set(reader_options(reader))
    extra = [k for k in READER_FIELDS if getattr(opts, k) is not None and k not in allowed]
    if extra:
        flags = ", ".join(f"--{k}" for k in extra)
        raise ValueError(f"{flags} does not apply to the {reader.SOURCE} reader")
    check = getattr(reader, "check_options", None)
    if check is not None:
        check(opts)
    return opts
