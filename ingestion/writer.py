"""Creating a feature store and appending to it crash-safely (the single-writer commit protocol).

Protocol: everything appended goes *past* the committed counts of ``commit.json``. ``append()``
writes a batch's segments at once and stages its small rows (segment index, record and reject
columns) in memory; ``commit()`` writes the staged rows, then replaces ``commit.json``
atomically (temp file, fsync, ``os.replace``, fsync of the directory). Readers use only the
committed counts, so a writer killed at any moment leaves a store whose visible content is its
last commit. When a writer next opens the store it truncates every array back to the committed
counts and removes zarr's leftover ``*.partial`` temp files (zarr 3.1's LocalStore writes each
chunk/shard and each ``zarr.json`` through a temp file + rename, so no file is ever half-written;
a killed run can only leave whole files past the commit point).

Batches (``RecordBatch``) are built on the workers by ``pack_batch``: it pseudonymises the raw
patient ids there (and redacts them from file-name-derived ids), so raw ids never reach the
driver or the store. Idempotency is keyed by ``path_hash`` (a keyed hash of the listed path).
One writer at a time holds an advisory lock on ``STORE/.lock``.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np

from ecgplat import store as S
from ecgplat.leads import LEADS
from ecgplat.privacy import pseudonymise
from ingestion.segment_codec import (
    ShardFiles,
    codecs,
    decode_segments,
    direct_layout,
    encode_segments,
)

_SEG_SHAPE = (S.N_LEADS, S.SEGMENT_SAMPLES)


@dataclass
class RecordBatch:
    """Conditioned records and rejects of one batch, as columns (no raw patient ids)."""

    seq: int  # batch number in listing order
    chunks: list[bytes]  # N encoded segments (one zarr chunk each), record order
    columns: dict[str, np.ndarray]  # record columns except seg_start
    rejects: list[tuple[str, str, str]] = field(default_factory=list)  # (source, path, reason)
    bytes_read: int = 0

    @property
    def n_records(self) -> int:
        return len(self.columns["record_key"])


def path_hash(source: str, rel: str, secret: bytes) -> str:
    """Keyed hash of a listed record path: the idempotency key of the store."""
    return hmac.new(secret, f"{source}\0{rel}".encode(), hashlib.sha256).hexdigest()[:32]


def redact(text: str, raw_id: str | None, patient_key: str) -> str:
    """``text`` with every standalone occurrence of ``raw_id`` (not inside a longer alphanumeric
    token) replaced by ``patient_key``."""
    raw = "" if raw_id is None else str(raw_id).strip()
    if not raw or raw not in text:
        return text
    pattern = rf"(?<![A-Za-z0-9]){re.escape(raw)}(?![A-Za-z0-9])"
    return re.sub(pattern, patient_key, text)


def patient_key_for(patient_id: str | None, record_key: str, secret: bytes) -> str:
    """The stored pseudonym: of the raw patient id, or of the record key when there is none
    (then each record is its own patient)."""
    if patient_id is None or str(patient_id).strip() == "":
        return pseudonymise("record:" + record_key, secret)
    return pseudonymise(str(patient_id), secret)


def pack_batch(
    seq: int,
    conditioned: list,
    rejects: list[tuple[str, str, str]],
    secret: bytes,
    bytes_read: int = 0,
) -> RecordBatch:
    """Columns of a batch of ``ingestion.conditioning.ConditionedRecord``s (in order)."""
    n = len(conditioned)
    cols: dict[str, np.ndarray] = {}
    for name, dtype, shape in S.RECORD_COLUMNS:
        if name == "seg_start":
            continue
        cols[name] = np.empty((n, *shape), dtype=object if dtype == "str" else dtype)
    for i, rec in enumerate(conditioned):
        patient = patient_key_for(rec.patient_id, rec.record_key, secret)
        record_id = redact(rec.record_id, rec.patient_id, patient)
        cols["record_key"][i] = f"{rec.source}/{record_id}"
        cols["source"][i] = rec.source
        cols["record_id"][i] = record_id
        cols["path"][i] = redact(rec.path, rec.patient_id, patient)
        cols["path_hash"][i] = path_hash(rec.source, rec.path, secret)
        cols["patient_key"][i] = patient
        cols["fs_original"][i] = float(rec.fs_original)
        cols["n_samples_original"][i] = int(rec.n_samples_original)
        cols["age"][i] = np.float32(rec.age if rec.age is not None else np.nan)
        cols["sex"][i] = rec.sex or ""
        cols["raw_codes"][i] = ";".join(str(c) for c in rec.codes)
        cols["labels"][i] = np.asarray(rec.labels, dtype=bool)
        cols["lead_mask"][i] = np.asarray(rec.lead_mask, dtype=bool)
        fold = (rec.extra or {}).get("strat_fold")
        cols["strat_fold"][i] = -1 if fold is None or np.isnan(float(fold)) else int(fold)
        cols["seg_count"][i] = rec.n_segments
    chunks = [c for r in conditioned for c in encode_segments(r.segments)]
    return RecordBatch(seq, chunks, cols, list(rejects), bytes_read)


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _str_array(values) -> np.ndarray:
    return np.asarray(list(values), dtype=str) if len(values) else np.zeros(0, dtype=str)


class StoreWriter:
    """The single writer of a store: creates it if needed, appends batches, commits, splits.

    Use as a context manager; it holds ``STORE/.lock`` until closed.
    """

    def __init__(self, path: str | os.PathLike, create: bool = True):
        import zarr

        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path}: exists and is not a directory")
        is_store = (self.path / "zarr.json").is_file()
        if not is_store:
            if not create:
                raise FileNotFoundError(f"{self.path}: no ecgplat store here")
            if self.path.exists() and any(p.name != ".lock" for p in self.path.iterdir()):
                raise ValueError(f"{self.path}: directory is not empty and is not an ecgplat store")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(f"{self.path}: store is being written by another process") from None
        try:
            self.root = zarr.open_group(str(self.path), mode="a")
            version = self.root.attrs.get("schema_version")
            if is_store and version is None and not self._only_own_entries():
                raise ValueError(f"{self.path}: a zarr group that is not an ecgplat store")
            if is_store and version not in (None, S.SCHEMA_VERSION):
                raise ValueError(
                    f"{self.path}: schema_version {version!r} is not {S.SCHEMA_VERSION}"
                )
            self._create_missing()
            self.committed = S.read_commit(self.path)
            self._recover()
        except BaseException:
            self.close()
            raise
        self._staged: dict[str, list[np.ndarray]] = {}
        self._shards = (
            ShardFiles(self.path, int(self.committed["n_segments"]))
            if direct_layout(self.root["segments"])
            else None
        )
        self.n_records = int(self.committed["n_records"])
        self.n_segments = int(self.committed["n_segments"])
        self.n_rejects = int(self.committed["n_rejects"])

    # ---- creation and recovery ----------------------------------------------------------
    _OWN_ENTRIES = frozenset(
        {
            "zarr.json",
            ".lock",
            S.SECRET_FILE,
            f".{S.SECRET_FILE}.tmp",
            S.COMMIT_FILE,
            "segments",
            "segment_record",
            "segment_number",
            "records",
            "rejects",
            "splits",
        }
    )

    def _only_own_entries(self) -> bool:
        """True for a store whose creation was interrupted (nothing but our own entries)."""
        return all(
            p.name in self._OWN_ENTRIES or p.name.endswith((".tmp", ".partial"))
            for p in self.path.iterdir()
        )

    def _create_missing(self) -> None:
        """Create whatever a (possibly half-created) store lacks; never touches existing data."""
        secret_file = self.path / S.SECRET_FILE
        if not secret_file.exists():
            tmp = self.path / f".{S.SECRET_FILE}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, secret_file)
        filters, compressors = codecs()

        def exists(key: str) -> bool:  # not group listing: it warns about our non-zarr files
            return (self.path / key / "zarr.json").is_file()

        if not exists("segments"):
            self.root.create_array(
                "segments",
                shape=(0, *_SEG_SHAPE),
                dtype="int16",
                chunks=(S.SEGMENT_CHUNK, *_SEG_SHAPE),
                shards=(S.SEGMENT_SHARD, *_SEG_SHAPE),
                filters=filters,
                compressors=compressors,
                fill_value=0,
            )
        for name, dtype in (("segment_record", "int64"), ("segment_number", "int32")):
            if not exists(name):
                self.root.create_array(name, shape=(0,), dtype=dtype, chunks=(65536,))
        records = self.root.require_group("records")
        for name, dtype, shape in S.RECORD_COLUMNS:
            if not exists(f"records/{name}"):
                records.create_array(
                    name,
                    shape=(0, *shape),
                    chunks=(S.RECORD_CHUNK, *shape),
                    dtype=str if dtype == "str" else dtype,
                )
        rejects = self.root.require_group("rejects")
        for name in S.REJECT_COLUMNS:
            if not exists(f"rejects/{name}"):
                rejects.create_array(name, shape=(0,), chunks=(S.RECORD_CHUNK,), dtype=str)
        self.root.require_group("splits")
        if "schema_version" not in self.root.attrs:
            self.root.attrs.update(
                {
                    "schema_version": S.SCHEMA_VERSION,
                    "sample_rate": S.SAMPLE_RATE,
                    "segment_samples": S.SEGMENT_SAMPLES,
                    "segment_seconds": S.SEGMENT_SECONDS,
                    "leads": list(LEADS),
                    "units": "uV",
                    "dtype": "int16",
                    "store_uuid": uuid.uuid4().hex,
                    "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                }
            )
        if not (self.path / S.COMMIT_FILE).exists():
            _atomic_write_json(
                self.path / S.COMMIT_FILE,
                {"n_records": 0, "n_segments": 0, "n_rejects": 0, "splits": None},
            )

    def _appendables(self):
        c = self.committed
        yield self.root["segments"], c["n_segments"]
        yield self.root["segment_record"], c["n_segments"]
        yield self.root["segment_number"], c["n_segments"]
        for name, _, _ in S.RECORD_COLUMNS:
            yield self.root[f"records/{name}"], c["n_records"]
        for name in S.REJECT_COLUMNS:
            yield self.root[f"rejects/{name}"], c["n_rejects"]

    def _recover(self) -> None:
        """Drop everything past the commit point: truncate arrays, delete stale split
        generations and zarr temp files."""
        for arr, n in self._appendables():
            if arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))
        current = self.committed.get("splits")
        splits_dir = self.path / "splits"
        for child in splits_dir.iterdir() if splits_dir.is_dir() else ():
            if child.is_dir() and child.name != current:
                shutil.rmtree(child)
        if direct_layout(self.root["segments"]):
            ShardFiles(self.path, 0).drop_beyond(int(self.committed["n_segments"]))
        for partial in self.path.rglob("*.partial"):
            partial.unlink(missing_ok=True)
        for tmp in self.path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    # ---- queries ------------------------------------------------------------------------
    @property
    def secret(self) -> bytes:
        return (self.path / S.SECRET_FILE).read_bytes()

    def done_paths(self, source: str, listing: list[str]) -> set[str]:
        """The paths of ``listing`` already stored or rejected for ``source``."""
        done: set[str] = set()
        for group, n in (("records", self.n_records), ("rejects", self.n_rejects)):
            if n == 0:
                continue
            src = S.as_str_array(self.root[f"{group}/source"][:n])
            hashes = S.as_str_array(self.root[f"{group}/path_hash"][:n])
            done.update(hashes[src == source].tolist())
        secret = self.secret
        return {rel for rel in listing if path_hash(source, rel, secret) in done}

    def record_keys(self) -> set[str]:
        if self.n_records == 0:
            return set()
        return set(S.as_str_array(self.root["records/record_key"][: self.n_records]).tolist())

    # ---- appending ----------------------------------------------------------------------
    @staticmethod
    def _put(arr, at: int, values) -> None:
        n = len(values)
        if n == 0:
            return
        arr.resize((at + n, *arr.shape[1:]))
        arr[at : at + n] = values

    def append(self, batch: RecordBatch, known_keys: set[str] | None = None) -> dict:
        """Add a batch past the current counts, invisible to readers until ``commit()``:
        segments are written now, the small arrays are staged in memory and written by
        ``commit()``. Returns what was added: records, segments, patient_keys, reject_reasons.

        A record whose record_key is already in the store (or in ``known_keys``, which is
        updated) becomes a reject instead of a duplicate row.
        """
        cols = batch.columns
        rejects = list(batch.rejects)
        keys = known_keys if known_keys is not None else self.record_keys()
        keep = np.ones(batch.n_records, dtype=bool)
        secret = self.secret
        reject_rows = [
            (src, rel, reason, path_hash(src, rel, secret)) for src, rel, reason in rejects
        ]
        for i, key in enumerate(cols["record_key"]):
            if key in keys:
                keep[i] = False
                reject_rows.append(
                    (
                        cols["source"][i],
                        cols["path"][i],
                        "duplicate record_key (already in the store)",
                        cols["path_hash"][i],
                    )
                )
            else:
                keys.add(key)
        seg_count = cols["seg_count"].astype(np.int64)
        seg_ends = np.cumsum(seg_count)
        seg_starts = seg_ends - seg_count
        if not keep.all():
            keep_seg = np.repeat(keep, seg_count)
            segments = [c for c, k in zip(batch.chunks, keep_seg) if k]
            cols = {k: v[keep] for k, v in cols.items()}
            seg_count = seg_count[keep]
            seg_ends = np.cumsum(seg_count)
            seg_starts = seg_ends - seg_count
        else:
            segments = batch.chunks
        n_rec, n_seg = len(seg_count), int(seg_count.sum())
        if len(segments) != n_seg:
            raise ValueError(
                f"batch {batch.seq}: {len(segments)} segments but seg_count sums to {n_seg}"
            )
        rec_index = self.n_records + np.arange(n_rec, dtype=np.int64)
        staged = {
            "segment_record": np.repeat(rec_index, seg_count),
            "segment_number": (np.arange(n_seg) - np.repeat(seg_starts, seg_count)).astype(
                np.int32
            ),
        }
        cols = dict(cols, seg_start=self.n_segments + seg_starts)
        for name, dtype, _ in S.RECORD_COLUMNS:
            staged[f"records/{name}"] = np.asarray(cols[name], object if dtype == "str" else dtype)
        for j, name in enumerate(S.REJECT_COLUMNS):
            staged[f"rejects/{name}"] = np.asarray([r[j] for r in reject_rows], dtype=object)
        # all-or-nothing: an interrupt before this point leaves the counts untouched
        if self._shards is not None:  # full shards are written now, past the committed counts
            self._shards.extend(segments)
        else:
            self._put(self.root["segments"], self.n_segments, decode_segments(segments))
        for key, values in staged.items():
            if len(values):
                self._staged.setdefault(key, []).append(values)
        self.n_records += n_rec
        self.n_segments += n_seg
        self.n_rejects += len(reject_rows)
        return {
            "records": n_rec,
            "segments": n_seg,
            "patient_keys": list(cols["patient_key"]),
            "reject_reasons": [r[2] for r in reject_rows],
        }

    def _flush(self) -> None:
        """Write the staged small arrays (index arrays, record and reject columns) past the
        committed counts: one write per array per commit instead of one per batch. Then the
        open shard of ``segments`` and the array's shape (its zarr.json)."""
        if self._shards is not None:
            self._shards.flush()
        seg = self.root["segments"]
        if seg.shape[0] != self.n_segments:
            seg.resize((self.n_segments, *seg.shape[1:]))
        for key, parts in self._staged.items():
            values = np.concatenate(parts)
            if values.dtype == object:
                values = _str_array(values)
            group = key.split("/")[0]
            count = {"records": "n_records", "rejects": "n_rejects"}.get(group, "n_segments")
            self._put(self.root[key], int(self.committed[count]), values)
        self._staged = {}

    def commit(self, splits: str | None | bool = False) -> None:
        """Make everything appended so far visible, atomically. ``splits`` (a generation name)
        switches the split assignment in the same commit."""
        self._flush()
        # Fault injection for the crash tests, the only one: ECGPLAT_FAULT_STOP=commit:N SIGKILLs
        # this process in the first commit that would make >= N records visible, with its rows
        # written past the commit point but commit.json not yet replaced.
        stop = os.environ.get("ECGPLAT_FAULT_STOP", "")
        if stop.startswith("commit:") and self.n_records >= int(stop[len("commit:") :]):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        state = {
            "n_records": self.n_records,
            "n_segments": self.n_segments,
            "n_rejects": self.n_rejects,
            "splits": self.committed.get("splits") if splits is False else splits,
        }
        _atomic_write_json(self.path / S.COMMIT_FILE, state)
        self.committed = state

    def write_splits(self, split, ident_split) -> None:
        """Replace the split assignment of all committed records atomically (a new generation
        under ``splits/``, switched to by one commit; the old one is then deleted)."""
        n = int(self.committed["n_records"])
        if len(split) != n or len(ident_split) != n:
            raise ValueError(f"{self.path}: split arrays must have {n} entries")
        if self.n_records != n:
            raise RuntimeError(f"{self.path}: uncommitted records pending; commit first")
        old = self.committed.get("splits")
        k = int(old[1:]) + 1 if old else 1
        generation = f"g{k}"
        group = self.root.require_group(f"splits/{generation}")
        for name, values in (("split", split), ("ident_split", ident_split)):
            arr = group.create_array(
                name, shape=(n,), chunks=(max(1, min(n, 65536)),), dtype=str, overwrite=True
            )
            if n:
                arr[:] = _str_array(values)
        self.commit(splits=generation)
        if old:
            shutil.rmtree(self.path / "splits" / old, ignore_errors=True)

    def close(self) -> None:
        if getattr(self, "_lock_fd", None) is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
