"""The read API of a store: ``open_store`` and ``EcgStore``, a view of the records, segments
and rejects at the store's last commit, less the records `ecgplat forget` took out.

Only rows below the counts in ``commit.json`` exist for a reader (``read_commit``); the
tombstone table ``forgotten.json`` (``read_forgotten``) masks forgotten records. Raw patient ids
are never written anywhere in the store. Layout: docs/formats.md ("Feature store").
"""

from __future__ import annotations

import json
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from ecgplat.store import sealed_counts as C
from ecgplat.store.schema import (
    ADDED_COLUMNS,
    COMMIT_FILE,
    FORGOTTEN_FILE,
    FORGOTTEN_FORMAT,
    N_LEADS,
    RECORD_COLUMNS,
    REJECT_COLUMNS,
    SCHEMA_VERSION,
    SECRET_FILE,
    SEGMENT_SAMPLES,
    SPLIT_COLUMNS,
    SPLITS_KEPT,
    UV_PER_MV,
    as_str_array,
    generation_number,
    is_url,
    quiet_zarr_warnings,
    store_file,
    zarr_array,
)

_COUNTS = ("n_records", "n_segments", "n_rejects")
_SEGMENT_ARRAYS = ("segments", "segment_record", "segment_number")
_GENERATION = re.compile(r"^g[0-9]+$")


def commit_file(path: str | os.PathLike) -> str | Path:
    """Where the commit point of the store at ``path`` (a folder or an fsspec URL) lies."""
    return f"{str(path).rstrip('/')}/{COMMIT_FILE}" if is_url(path) else Path(path) / COMMIT_FILE


def read_commit(path: str | os.PathLike) -> dict:
    """The committed counts of a store (zeros for a store that never committed); ValueError
    naming the file when it is not a valid commit point."""
    file = commit_file(path)
    try:
        raw = store_file(path, COMMIT_FILE)
        if raw is None:
            return {"n_records": 0, "n_segments": 0, "n_rejects": 0, "splits": None}
        state = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: corrupt commit point, not JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{file}: cannot read the commit point ({e.strerror or e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file}: corrupt commit point (not a JSON object)")
    for key in _COUNTS:
        value = state.get(key)
        if type(value) is not int or value < 0:
            raise ValueError(f"{file}: corrupt commit point ({key}={value!r} is not a count)")
    splits = state.get("splits")
    if splits is not None and not (isinstance(splits, str) and _GENERATION.match(splits)):
        raise ValueError(f"{file}: corrupt commit point (splits={splits!r})")
    return state


def appended_arrays(committed: dict) -> list[tuple[str, str, int]]:
    """(array key, count name, committed length) of every array a writer appends to."""
    return [
        *((key, "n_segments", committed["n_segments"]) for key in _SEGMENT_ARRAYS),
        *(
            (f"records/{name}", "n_records", committed["n_records"])
            for name, _, _ in RECORD_COLUMNS
        ),
        *((f"rejects/{name}", "n_rejects", committed["n_rejects"]) for name in REJECT_COLUMNS),
    ]


def check_lengths(root, committed: dict, file) -> None:
    """ValueError naming the commit point ``file`` when it counts more rows than an array
    holds (a copy of a store taken while it was being written): the rows past an array's end
    were never written, and reading, splitting or sealing them would make up records. The
    columns added since schema 1's first release may be shorter: their missing rows read as
    their defaults (``ADDED_COLUMNS``)."""
    for key, count, n in appended_arrays(committed):
        if key.removeprefix("records/") in ADDED_COLUMNS:
            continue
        try:
            have = int(zarr_array(root, key).shape[0])
        except KeyError:
            continue  # refused with its own message when read
        if have < n:
            raise ValueError(
                f"{file}: corrupt commit point ({count}={n} but {key} holds {have} rows)"
            )


def read_forgotten(path: str | os.PathLike) -> dict:
    """The tombstone table of a store (``forgotten.json``; an empty one when there is none):
    ``generation`` (bumped by every forget), ``scrubbed`` (the last generation whose data files
    were rewritten), ``records`` (record indices, ascending) and per-record keyed hashes.
    ValueError naming the file when it is corrupt."""
    file = (
        f"{str(path).rstrip('/')}/{FORGOTTEN_FILE}" if is_url(path) else Path(path) / FORGOTTEN_FILE
    )
    empty = {"format": FORGOTTEN_FORMAT, "generation": 0, "scrubbed": 0, "records": []}
    try:
        raw = store_file(path, FORGOTTEN_FILE)  # a local path or a URL (a published store)
        if raw is None:
            return dict(empty, key_hash=[], patient_hash=[], record_generation=[], operations=[])
        table = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ValueError(f"{file}: corrupt tombstone table ({e})") from None
    ok = isinstance(table, dict) and table.get("format") == FORGOTTEN_FORMAT
    columns = ("records", "key_hash", "patient_hash", "record_generation")
    ok = ok and all(type(table.get(k)) is int for k in ("generation", "scrubbed"))
    ok = ok and all(isinstance(table.get(k), list) for k in columns)
    if not ok or len({len(table[k]) for k in columns}) != 1:
        raise ValueError(f"{file}: corrupt tombstone table (not an {FORGOTTEN_FORMAT} object)")
    return table


class ForgottenRecordError(LookupError):
    """A read of a record (or segment) that `ecgplat forget` took out of the store."""


STR = np.dtypes.StringDType()  # numpy's variable-width str


def _str_codes(values) -> tuple[np.ndarray, np.ndarray]:
    """(int64 codes, sorted distinct values as a numpy StringDType array) of a string array.
    StringDType is sorted as it is (UTF-8 order = code point order = Python's), so no Python
    str is made per entry or per distinct value; object arrays go through pandas. (np.unique
    of a StringDType array can crash, hence the explicit sort.)"""
    values = np.asarray(values)
    if values.dtype == object:
        codes, distinct = pd.factorize(values, sort=True)
        return codes.astype(np.int64, copy=False), np.asarray(distinct, dtype=STR)
    few = _few_codes(values)
    if few is not None:
        return few
    order = np.argsort(values, kind="stable")
    first = np.ones(len(values), dtype=bool)  # where a new value starts in sorted order
    for s in range(0, len(order) - 1, 65536):  # no sorted copy of the whole column
        run = values[order[s : s + 65537]]
        first[s + 1 : s + len(run)] = run[1:] != run[:-1]
    codes = np.empty(len(values), dtype=np.int64)
    codes[order] = np.cumsum(first) - 1
    return codes, values[order[first]].astype(STR, copy=False)


FEW_VALUES = 8  # up to this many distinct values, one comparison pass each beats a sort


def _few_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """`_str_codes` of a column of at most FEW_VALUES distinct strings (a split column, a
    source) by one vectorised comparison per value, or None for a column of more."""
    if len(set(values[:4096].tolist())) > FEW_VALUES:
        return None
    codes = np.empty(len(values), dtype=np.int64)
    found: list[str] = []
    left = np.ones(len(values), dtype=bool)
    while left.any():
        if len(found) == FEW_VALUES:
            return None
        first = values[int(np.argmax(left))]
        same = values == first
        codes[same] = len(found)
        found.append(str(first))
        left &= ~same
    distinct = np.array(found, dtype=STR)
    order = np.argsort(distinct, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank[codes], distinct[order]


def _read_codes(array, n: int) -> tuple[np.ndarray, np.ndarray]:
    """`_str_codes` of the first `n` entries of a zarr string column ("" past its end; None: a
    column of "")."""
    values = np.asarray(array[:n]) if array is not None else np.zeros(0, dtype=STR)
    if len(values) < n:
        values = np.concatenate([values, np.full(n - len(values), "", dtype=values.dtype)])
    return _str_codes(values)


def _read_str(array, n: int) -> np.ndarray:
    """A zarr string column as an object array of `n` str ("" past its end; None: all ""),
    through its codes: one str object per distinct value, not one per entry."""
    codes, values = _read_codes(array, n)
    return values.astype(object)[codes]


def open_store(path: str | os.PathLike, mode: Literal["r", "r+"] = "r") -> EcgStore:
    """Open an existing store for reading (``mode="r"``) or for adding groups (``"r+"``).

    Raises FileNotFoundError if there is no store at ``path`` and ValueError if it is not an
    ecgplat store of a schema version this code reads.
    """
    if mode not in ("r", "r+"):
        raise ValueError(f"{path}: open_store mode must be 'r' or 'r+', got {mode!r}")
    return EcgStore(path, mode)


class EcgStore:
    """Read view of a feature store at its last commit (layout: docs/formats.md). ``path`` may
    be an fsspec URL (``http://``, ``s3://``, ...): the store is then read through zarr's
    fsspec support, read-only."""

    def __init__(self, path: str | os.PathLike, mode: Literal["r", "r+"] = "r"):
        import zarr

        self.path = str(path).rstrip("/") if is_url(path) else Path(path)
        quiet_zarr_warnings()
        if is_url(path) and mode != "r":
            raise ValueError(f"{self.path}: a store at a URL opens read-only (mode 'r')")
        if not self._has_file("zarr.json"):
            raise FileNotFoundError(f"{self.path}: no ecgplat store here (zarr.json missing)")
        try:
            self.root = zarr.open_group(str(self.path), mode=mode)
        except Exception as e:  # noqa: BLE001 - any failure here means a corrupt zarr.json
            raise ValueError(f"{self.path}: not a readable zarr v3 group ({e})") from None
        attrs = dict(self.root.attrs)
        version = attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"{self.path}: not an ecgplat store of schema version {SCHEMA_VERSION} "
                f"(found schema_version={version!r})"
            )
        self.attrs = attrs
        self._commit = read_commit(self.path)
        check_lengths(self.root, self._commit, commit_file(self.path))
        self.n_records = int(self._commit["n_records"])
        self.n_segments = int(self._commit["n_segments"])
        self.n_rejects = int(self._commit["n_rejects"])
        self._forgotten = read_forgotten(self.path)
        self._columns: dict[str, np.ndarray] = {}

    def _has_file(self, name: str) -> bool:
        if isinstance(self.path, Path):
            return (self.path / name).is_file()
        return store_file(self.path, name) is not None

    def __repr__(self) -> str:
        return f"EcgStore({str(self.path)!r}, records={self.n_records}, segments={self.n_segments})"

    # ---- tombstones (ecgplat forget) -------------------------------------------------------
    @property
    def forget_generation(self) -> int:
        """Bumped by every `ecgplat forget`; recorded by shard exports and indexes built from
        the store, which are stale once it moves on."""
        return int(self._forgotten["generation"])

    @property
    def tombstones(self) -> dict:
        """The tombstone table this view reads (``forgotten.json``, as ``read_forgotten``)."""
        return self._forgotten

    @property
    def forget_pending(self) -> bool:
        """True while a forget has masked records but not yet rewritten their data files."""
        return self._forgotten["scrubbed"] < self._forgotten["generation"]

    @cached_property
    def forgotten(self) -> np.ndarray:
        """int64 (F,): record indices taken out by `ecgplat forget`, ascending."""
        rows = np.unique(np.asarray(self._forgotten["records"], dtype=np.int64))
        return rows[rows < self.n_records]

    @cached_property
    def live(self) -> np.ndarray:
        """bool (R,): records not forgotten."""
        keep = np.ones(self.n_records, dtype=bool)
        keep[self.forgotten] = False
        return keep

    @cached_property
    def _forgotten_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self.forgotten
        starts = np.asarray(zarr_array(self.root, "records/seg_start")[: self.n_records])[rows]
        counts = np.asarray(zarr_array(self.root, "records/seg_count")[: self.n_records])[rows]
        order = np.argsort(starts)
        return starts[order].astype(np.int64), (starts + counts)[order].astype(np.int64)

    def _refuse_forgotten_segments(self, idx: np.ndarray) -> None:
        if not len(self.forgotten) or not idx.size:
            return
        starts, stops = self._forgotten_ranges
        pos = np.searchsorted(starts, idx, side="right") - 1
        hit = (pos >= 0) & (idx < stops[np.maximum(pos, 0)])
        if hit.any():
            raise ForgottenRecordError(
                f"{self.path}: segment {int(idx[hit][0])} belongs to a forgotten record"
            )

    # ---- record table -------------------------------------------------------------------
    def _column(self, name: str) -> np.ndarray:
        if name in ADDED_COLUMNS:
            return self._added_column(name)
        return np.asarray(zarr_array(self.root, f"records/{name}")[: self.n_records])

    def _added_column(self, name: str) -> np.ndarray:
        """A column added after schema 1's first release (units, filter, derived_mask): the
        rows a store lacks (no such array, or one shorter than the records) and empty strings
        read as its default (``ADDED_COLUMNS``); str columns as object arrays."""
        default = ADDED_COLUMNS[name]
        text = isinstance(default, str)
        shape = next(s for n, _, s in RECORD_COLUMNS if n == name)
        out = np.full((self.n_records, *shape), default, dtype=object if text else None)
        if self._has_file(f"records/{name}/zarr.json"):
            values = np.asarray(zarr_array(self.root, f"records/{name}")[: self.n_records])
            n = len(values)
            if text:
                values = as_str_array(values)
                out[:n] = np.where(values == "", str(default), values)
            else:
                out[:n] = values
        return out

    @property
    def split_generation(self) -> str | None:
        """Name of the split generation this view reads (``g<k>``), None before any split."""
        return self._commit.get("splits")

    def _split_columns(self, read=None, names: tuple[str, ...] = SPLIT_COLUMNS) -> dict:
        """The split columns `names` of one generation, each as ``read(zarr array, n_records)``
        (default: an object array of str). A concurrent `split` deletes a generation only once
        two newer ones are committed; if that happened while this view read it (the read fails
        or the generation is no longer kept afterwards), the read moves to the current
        generation and is repeated."""
        read = read or _read_str
        generation = self._commit.get("splits")
        for _ in range(5):
            if not generation:
                return {name: read(None, self.n_records) for name in names}
            try:
                out = {
                    name: read(zarr_array(self.root, f"splits/{generation}/{name}"), self.n_records)
                    for name in names
                }
                complete = True
            except (KeyError, FileNotFoundError):
                complete = False
            now = read_commit(self.path).get("splits")
            if complete and generation_number(now) - generation_number(generation) < SPLITS_KEPT:
                self._commit = dict(self._commit, splits=generation)
                return out
            generation = now
        raise RuntimeError(f"{self.path}: the split assignment kept changing while being read")

    @cached_property
    def records(self) -> pd.DataFrame:
        """One row per committed record; the index is the record index."""
        data = {}
        for name, dtype, shape in RECORD_COLUMNS:
            if shape:
                continue
            values = self._column(name)
            data[name] = as_str_array(values) if dtype == "str" else np.asarray(values)
        data.update(self._splits)
        gone = self.forgotten
        for name in ("record_key", "record_id", "path", "patient_key", "raw_codes", "sex"):
            data[name][gone] = ""  # masked here; the files lose them once the forget is scrubbed
        for name in SPLIT_COLUMNS:
            data[name][gone] = ""
        frame = pd.DataFrame(data, index=pd.RangeIndex(self.n_records, name="record_index"))
        for name, dtype, _shape in RECORD_COLUMNS:
            if dtype == "str":
                frame[name] = frame[name].astype(object)
        return frame

    @cached_property
    def labels(self) -> np.ndarray:
        """bool (R, 26) multi-hot of the 26 scored classes (all False for forgotten records)."""
        out = np.array(self._column("labels"), dtype=bool)
        out[self.forgotten] = False
        return out

    @cached_property
    def lead_masks(self) -> np.ndarray:
        """bool (R, 12): leads present in each record's file (none for forgotten records)."""
        out = np.array(self._column("lead_mask"), dtype=bool)
        out[self.forgotten] = False
        return out

    @cached_property
    def derived_masks(self) -> np.ndarray:
        """bool (R, 12): leads a vendor file held only as computed from others (GE MUSE's III,
        aVR, aVL, aVF), a subset of ``lead_masks``; all False in stores written before the
        column existed, and for forgotten records."""
        out = np.array(self._column("derived_mask"), dtype=bool)
        out[self.forgotten] = False
        return out

    def select(self, split=None, source=None, patient_key=None, ident_split=None) -> np.ndarray:
        """Record indices (sorted int64) matching every given filter; each filter is a value or a
        list of values. Forgotten records are never selected."""
        keep = self.live.copy()
        for column, wanted in (
            ("split", split),
            ("source", source),
            ("patient_key", patient_key),
            ("ident_split", ident_split),
        ):
            if wanted is None:
                continue
            values = [wanted] if isinstance(wanted, str) else list(wanted)
            keep &= pd.Series(self.column(column)).isin(values).to_numpy()
        return np.flatnonzero(keep).astype(np.int64)

    @cached_property
    def _splits(self) -> dict[str, np.ndarray]:
        return self._split_columns()

    def column(self, name: str) -> np.ndarray:
        """One scalar record column (or ``split`` / ``ident_split``) as a numpy array, str
        columns as object arrays. Reads only that column unless ``records`` is already loaded:
        at a million records the whole table takes seconds, one column a fraction of that."""
        if "records" in self.__dict__:
            return self.records[name].to_numpy()
        if name in SPLIT_COLUMNS:
            return self._splits[name]
        kinds = {n: dtype for n, dtype, shape in RECORD_COLUMNS if not shape}
        if name not in kinds:
            raise KeyError(f"{self.path}: no record column {name!r}")
        if name not in self._columns:
            values = self._column(name)
            self._columns[name] = (
                as_str_array(values) if kinds[name] == "str" else np.asarray(values)
            )
        return self._columns[name]

    def column_at(self, name: str, index) -> np.ndarray:
        """One scalar record column at record indices `index` (any order, repeats allowed), str
        columns as object arrays. Reads only the chunks holding those records, unless the
        column is already loaded: a gallery's keys without the whole store's."""
        index = np.asarray(index, dtype=np.int64)
        if "records" in self.__dict__ or name in self._columns:
            return self.column(name)[index]
        if name in SPLIT_COLUMNS or name in ADDED_COLUMNS:  # read whole (may be absent)
            return self.column(name)[index]
        kinds = {n: dtype for n, dtype, shape in RECORD_COLUMNS if not shape}
        if name not in kinds:
            raise KeyError(f"{self.path}: no record column {name!r}")
        ascending = len(index) < 2 or bool((index[1:] > index[:-1]).all())
        distinct, back = (index, None) if ascending else np.unique(index, return_inverse=True)
        if len(distinct) and not (distinct[0] >= 0 and distinct[-1] < self.n_records):
            raise IndexError(f"{self.path}: record index out of range 0..{self.n_records - 1}")
        array = zarr_array(self.root, f"records/{name}")
        text = kinds[name] == "str"
        values = np.empty(len(distinct), dtype=object if text else np.asarray(array[:0]).dtype)
        for s in range(0, len(distinct), 8192):  # a part at a time: no whole numpy-str copy
            part = np.asarray(array.get_orthogonal_selection(distinct[s : s + 8192]))
            values[s : s + len(part)] = as_str_array(part) if text else part
        return values if back is None else values[back]

    def column_codes(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(int64 codes, sorted distinct values as a numpy StringDType array) of one str record
        column (or ``split`` / ``ident_split``): ``values[codes]`` is the column. Nothing is
        cached and no Python str is made per record, so a pass over a million records' keys
        stays small; codes order like the strings (a code's rank is its value's rank)."""
        if "records" in self.__dict__ or name in self._columns:
            return _str_codes(self.column(name))
        if name in SPLIT_COLUMNS:
            if "_splits" in self.__dict__:
                return _str_codes(self.column(name))
            return self._split_columns(read=_read_codes, names=(name,))[name]
        if name in ADDED_COLUMNS:
            return _str_codes(self._added_column(name))
        return _read_codes(zarr_array(self.root, f"records/{name}"), self.n_records)

    # ---- segments -----------------------------------------------------------------------
    @cached_property
    def segment_record_index(self) -> np.ndarray:
        """int64 (N,): record index of each segment."""
        return np.asarray(
            zarr_array(self.root, "segment_record")[: self.n_segments], dtype=np.int64
        )

    @cached_property
    def segment_number(self) -> np.ndarray:
        """int32 (N,): window number of each segment within its record."""
        return np.asarray(
            zarr_array(self.root, "segment_number")[: self.n_segments], dtype=np.int32
        )

    def record_segment_range(self, i: int) -> tuple[int, int]:
        """(start, stop) segment rows of record ``i``; ForgottenRecordError for a forgotten
        record."""
        if not 0 <= int(i) < self.n_records:
            raise IndexError(f"{self.path}: record index {i} out of range 0..{self.n_records - 1}")
        if not self.live[int(i)]:
            raise ForgottenRecordError(f"{self.path}: record index {i} was forgotten")
        if "records" in self.__dict__ or "seg_start" in self._columns:
            i = int(i)
            start, count = int(self.column("seg_start")[i]), int(self.column("seg_count")[i])
        else:  # two elements, not the whole record table
            i = int(i)
            start = int(np.asarray(zarr_array(self.root, "records/seg_start")[i : i + 1])[0])
            count = int(np.asarray(zarr_array(self.root, "records/seg_count")[i : i + 1])[0])
        return start, start + count

    def record_segments_raw(self, i: int) -> np.ndarray:
        """int16 (S, 12, 2500) microvolts of record ``i``, as stored."""
        start, stop = self.record_segment_range(i)
        return np.asarray(zarr_array(self.root, "segments")[start:stop])

    def record_segments(self, i: int) -> np.ndarray:
        """float32 (S, 12, 2500) millivolts of record ``i``."""
        return to_millivolts(self.record_segments_raw(i))

    def read_segments_raw(self, seg_idx) -> np.ndarray:
        """int16 (n, 12, 2500) microvolts of the given segment rows (any order, repeats allowed)."""
        idx = np.asarray(seg_idx, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            return np.zeros((0, N_LEADS, SEGMENT_SAMPLES), dtype=np.int16)
        if idx.min() < 0 or idx.max() >= self.n_segments:
            raise IndexError(f"{self.path}: segment index out of range 0..{self.n_segments - 1}")
        self._refuse_forgotten_segments(idx)
        unique, inverse = np.unique(idx, return_inverse=True)
        arr = zarr_array(self.root, "segments")
        if unique[-1] - unique[0] + 1 == unique.size:  # one contiguous run: a plain slice
            block = np.asarray(arr[int(unique[0]) : int(unique[-1]) + 1])
        else:
            block = np.asarray(arr.oindex[unique])
        return block[inverse]

    def read_segments(self, seg_idx) -> np.ndarray:
        """float32 (n, 12, 2500) millivolts of the given segment rows."""
        return to_millivolts(self.read_segments_raw(seg_idx))

    @cached_property
    def rejects(self) -> pd.DataFrame:
        """The committed rejects: source, path, reason."""
        data = {
            name: as_str_array(zarr_array(self.root, f"rejects/{name}")[: self.n_rejects])
            for name in REJECT_COLUMNS
        }
        return pd.DataFrame(data)

    def stored_counts(self) -> dict | None:
        """The counts kept by the writers in ``commit.json`` when they verify and describe
        this view's commit and tombstone table (``sealed_counts.unseal``); None otherwise."""
        return C.unseal(self._commit, self._forgotten, store_file(self.path, SECRET_FILE))

    def count(self) -> dict:
        """The counts of ``summary`` tallied from the record columns (every row is read)."""
        live = self.live
        reasons = as_str_array(zarr_array(self.root, "rejects/reason")[: self.n_rejects])
        source, patient_key, seg_count, split, ident_split = (
            self.column(name)[live]
            for name in ("source", "patient_key", "seg_count", *SPLIT_COLUMNS)
        )
        kinds = (C.reason_kind(r) for r in reasons)
        return C.tally(source, patient_key, seg_count, split, ident_split, kinds)

    def summary(self) -> dict:
        """Counts for `ecgplat info`: records, segments, patients, per source/split/ident_split,
        rejects by reason, forgotten records. Forgotten records count only as ``forgotten``.
        The counts stored at the commit are used when they verify, else they are tallied."""
        counts = self.stored_counts() or self.count()
        return {
            "path": str(self.path),
            "schema_version": self.attrs.get("schema_version"),
            "store_uuid": self.attrs.get("store_uuid"),
            **{k: counts[k] for k in C.FIELDS if k != "rejects_by_reason"},
            "rejects": self.n_rejects,
            "rejects_by_reason": counts["rejects_by_reason"],
            "forgotten": len(self.forgotten),
            "forget_generation": self.forget_generation,
            "forget_pending": self.forget_pending,
        }


def to_millivolts(x_uv: np.ndarray) -> np.ndarray:
    """int16 microvolts -> float32 millivolts."""
    return np.asarray(x_uv, dtype=np.float32) / np.float32(UV_PER_MV)
