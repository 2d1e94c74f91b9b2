"""The one set of options an ingest passes to its readers: what a reader may open, how large a
record may be (checked from the header, before any read) and how to interpret the samples.

``ReadOptions`` carries the bounds every reader applies:

- the sampling rate must be a finite number in ``[min_fs, max_fs]`` Hz and the duration at most
  ``max_seconds``: together they bound the samples a record has before anything is allocated
  (a ``wfdb`` record is then conditioned in blocks, its memory not growing with its duration);
- every file a reader opens must lie inside the source directory ``SRC``: absolute names and
  ``..`` escapes are always refused; symbolic links are refused unless ``follow_symlinks``, and
  then must still resolve inside the resolved ``SRC`` unless ``allow_outside``.

and the user's answers a reader cannot find in the files themselves (``READER_FIELDS``; each
reader names the ones it takes in its ``OPTIONS``, and
``ingestion.readers.protocol.check_reader_options`` refuses the others): ``units`` (WFDB: opt
into a non-voltage unit such as ``z``; arrays: the unit of their values,
``ingestion.readers.units``), and for bring-your-own arrays ``fs``, ``leads`` and ``patients``
(``ingestion.readers.numpy_arrays``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ingestion.readers.record import RecordError

DEFAULT_MIN_FS = 50.0
DEFAULT_MAX_FS = 10_000.0
# PhysioNet/CinC 2021 records reach 1,800 s; one hour of 12 leads at 10 kHz (an 864 MB file)
# ingests in about 221 MiB (docs/operations.md, "Memory per record")
DEFAULT_MAX_SECONDS = 3600.0


@dataclass(frozen=True)
class ReadOptions:
    """Bounds and path policy shared by every corpus reader (picklable, sent to Dask workers)."""

    min_fs: float = DEFAULT_MIN_FS
    max_fs: float = DEFAULT_MAX_FS
    max_seconds: float = DEFAULT_MAX_SECONDS
    follow_symlinks: bool = False
    allow_outside: bool = False
    units: str | None = None  # --units (ingestion.readers.units)
    fs: float | None = None  # --fs: sampling rate of user arrays, Hz
    leads: str | None = None  # --leads: comma-separated lead names of user arrays
    patients: str | None = None  # --patients: CSV of user arrays (record_id, patient_id, labels)
    # --filter: zero-phase filters applied in conditioning (ingestion.filters), None = off
    signal_filter: str | None = None

    def __post_init__(self):
        if not (0 < self.min_fs <= self.max_fs < math.inf):
            raise ValueError(
                f"sampling-rate range must satisfy 0 < min ({self.min_fs}) <= max ({self.max_fs})"
            )
        if not (0 < self.max_seconds < math.inf):
            raise ValueError(f"max duration must be a positive number, got {self.max_seconds}")
        if self.allow_outside and not self.follow_symlinks:
            raise ValueError("--allow-outside only makes sense with --follow-symlinks")
        if self.signal_filter is not None:
            from ingestion.filters import parse_filter

            parse_filter(self.signal_filter)  # ValueError naming --filter


DEFAULT_OPTIONS = ReadOptions()
READER_FIELDS = ("units", "fs", "leads", "patients")  # taken only by readers listing them


def check_rate(where: str, fs: float, opts: ReadOptions | None = None) -> None:
    """RecordError unless ``fs`` is finite, positive and inside the supported range."""
    opts = opts or DEFAULT_OPTIONS
    if not (isinstance(fs, int | float) and math.isfinite(fs) and fs > 0):
        raise RecordError(where, "sampling rate is not a finite positive number")
    if not opts.min_fs <= fs <= opts.max_fs:
        raise RecordError(
            where,
            f"sampling rate {fs:g} Hz is outside the supported range "
            f"{opts.min_fs:g}-{opts.max_fs:g} Hz (--min-fs/--max-fs)",
        )


def check_length(where: str, fs: float, n_samples: int, opts: ReadOptions | None = None) -> None:
    """``check_rate`` plus: the duration ``n_samples / fs`` is at most ``max_seconds``."""
    opts = opts or DEFAULT_OPTIONS
    check_rate(where, fs, opts)
    seconds = n_samples / fs
    if seconds > opts.max_seconds:
        raise RecordError(
            where,
            f"duration {seconds:.0f} s exceeds the maximum {opts.max_seconds:g} s (--max-duration)",
        )


def _inside(path: str, root: str) -> bool:
    """``path`` is ``root`` or below it (both absolute and normalised)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def inside_src(src: Path, rel: str, where: str, opts: ReadOptions | None = None) -> Path:
    """The path ``SRC/rel`` after checking the policy of the module docstring; RecordError
    (naming the rule, never the target) otherwise. ``rel`` uses ``/`` separators. String path
    operations (os.path), not pathlib: this runs for every file of every record."""
    opts = opts or DEFAULT_OPTIONS
    root = os.path.abspath(src)
    if os.path.isabs(rel) or rel.startswith("~"):
        raise RecordError(where, "refused: absolute file path (files must lie inside SRC)")
    lexical = os.path.normpath(os.path.join(root, rel))
    if not _inside(lexical, root) or lexical == root:
        raise RecordError(where, "refused: file path leads outside SRC ('..')")
    if not opts.follow_symlinks:
        node = root
        for part in os.path.relpath(lexical, root).split(os.sep):
            node = os.path.join(node, part)
            if os.path.islink(node):
                raise RecordError(where, "refused: symbolic link (allow with --follow-symlinks)")
    elif not opts.allow_outside and not _inside(os.path.realpath(lexical), os.path.realpath(root)):
        raise RecordError(
            where, "refused: symbolic link resolves outside SRC (allow with --allow-outside)"
        )
    return Path(lexical)


def sibling(src: Path, rel: str, name: str, where: str, opts: ReadOptions | None = None) -> Path:
    """``inside_src`` for a file named in the header of record ``rel`` (relative to its folder)."""
    if os.path.isabs(name) or name.startswith("~"):
        raise RecordError(where, "refused: absolute file path (files must lie inside SRC)")
    folder = os.path.dirname(rel)
    return inside_src(src, f"{folder}/{name}" if folder else name, where, opts)
