"""Appending to a feature store and committing, crash-safely (the single-writer commit protocol).

Protocol: everything appended goes *past* the committed counts of ``commit.json``. ``append()``
writes a batch's segments at once and stages its small rows (segment index, record and reject
columns) in memory; ``commit()`` writes the staged rows, then replaces ``commit.json`` through
``ecgplat.atomic``. Readers use only the committed counts, so a writer killed at any moment
leaves a store whose visible content is its last commit; the next ``StoreWriter`` creates or
recovers the store to that commit point first (``ecgplat.store.create``). Layout:
docs/formats.md.

Batches (``RecordBatch``) are built on the workers by ``pack_batch``: it pseudonymises the raw
patient ids there (and redacts them from file-name-derived ids), so raw ids never reach the
driver or the store. Idempotency is keyed by ``path_hash`` (a keyed hash of the listed path).
One writer at a time holds an advisory lock on ``STORE/.lock``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np

from ecgplat import atomic, faults
from ecgplat.leads import LEADS, canonical_lead
from ecgplat.privacy import pseudonymise
from ecgplat.store import schema as S
from ecgplat.store import sealed_counts as C
from ecgplat.store.create import drop_generations, open_at_commit
from ecgplat.store.read import open_store
from ecgplat.store.segment_codec import ShardFiles, decode_segments, direct_layout, encode_segments


@dataclass
class RecordBatch:
    """Conditioned records and rejects of one batch, as columns (no raw patient ids)."""

    seq: int  # batch number in listing order
    chunks: list[bytes]  # N encoded segments (one zarr chunk each), record order
    columns: dict[str, np.ndarray]  # record columns except seg_start
    # (source, path, reason, path_hash): path and reason already redacted, hash of the raw path;
    # a 3-tuple (source, raw path, reason) is hashed by the writer
    rejects: list[tuple] = field(default_factory=list)
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


def derived_mask(extra: dict | None, lead_mask) -> np.ndarray:
    """bool (12,): the present leads a reader computed from others, from the canonical names
    it put in ``extra["derived_leads"]`` (GE MUSE files hold III, aVR, aVL and aVF only that
    way)."""
    names = {canonical_lead(str(n)) for n in (extra or {}).get("derived_leads") or ()}
    return np.array([lead in names for lead in LEADS]) & np.asarray(lead_mask, dtype=bool)


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
        cols["units"][i] = rec.units
        cols["filter"][i] = getattr(rec, "filter", "")
        cols["derived_mask"][i] = derived_mask(rec.extra, rec.lead_mask)
    chunks = [c for r in conditioned for c in encode_segments(r.segments)]
    return RecordBatch(seq, chunks, cols, list(rejects), bytes_read)


SPLIT_CHUNK = 8192  # records per chunk of a split column


def _str_array(values) -> np.ndarray:
    return np.asarray(list(values), dtype=str) if len(values) else np.zeros(0, dtype=str)


class StoreWriter:
    """The single writer of a store: opens it (created or recovered to its commit point by
    ``ecgplat.store.create``), appends batches, commits, splits.

    Use as a context manager; it holds ``STORE/.lock`` until closed.
    """

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        self._lock: S.StoreLock | None
        self._lock, self.root, self.committed = open_at_commit(self.path, create)
        self._staged: dict[str, list[np.ndarray]] = {}
        # the counts of the last commit and its live patient keys, loaded when first needed
        self._counts: dict | None = None
        self._patients: set[str] | None = None
        self._forgotten: dict = {}  # the tombstone table the counts were loaded with
        self._shards = (
            ShardFiles(self.path, int(self.committed["n_segments"]))
            if direct_layout(self.root["segments"])
            else None
        )
        self.n_records = int(self.committed["n_records"])
        self.n_segments = int(self.committed["n_segments"])
        self.n_rejects = int(self.committed["n_rejects"])

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
            src = S.as_str_array(S.zarr_array(self.root, f"{group}/source")[:n])
            hashes = S.as_str_array(S.zarr_array(self.root, f"{group}/path_hash")[:n])
            done.update(hashes[src == source].tolist())
        secret = self.secret
        return {rel for rel in listing if path_hash(source, rel, secret) in done}

    def record_keys(self) -> set[str]:
        if self.n_records == 0:
            return set()
        return set(
            S.as_str_array(S.zarr_array(self.root, "records/record_key")[: self.n_records]).tolist()
        )

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
            r if len(r) == 4 else (r[0], r[1], r[2], path_hash(r[0], r[1], secret)) for r in rejects
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
            segments = [c for c, k in zip(batch.chunks, keep_seg, strict=True) if k]
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
        staged: dict[str, np.ndarray] = {
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
        seg = S.zarr_array(self.root, "segments")
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
        if self._shards is not None:
            # last, so that on Linux its one syncfs also makes the small arrays zarr just
            # wrote durable before commit.json counts them
            self._shards.sync()

    def commit(self, splits: str | None | bool = False, split_counts: dict | None = None) -> None:
        """Make everything appended so far visible, atomically. ``splits`` (a generation name)
        switches the split assignment in the same commit; ``split_counts`` are then its
        per_split and per_ident_split counts."""
        counts, new_patients = self._next_counts(split_counts)
        self._flush()
        # crash tests: ECGPLAT_FAULT_STOP=commit:N dies in the first commit that would make >= N
        # records visible, rows written past the commit point but commit.json not yet replaced
        faults.stop_at_count("commit", self.n_records)
        state = {
            "n_records": self.n_records,
            "n_segments": self.n_segments,
            "n_rejects": self.n_rejects,
            "splits": self.committed.get("splits") if splits is False else splits,
        }
        if counts is not None:
            state[C.COUNTS_KEY] = C.seal(counts, state, self._forgotten, self.secret)
        elif C.COUNTS_KEY in self.committed:  # nothing changed: the sealed counts still hold
            state[C.COUNTS_KEY] = self.committed[C.COUNTS_KEY]
        atomic.write_json(self.path / S.COMMIT_FILE, state, sort_keys=True)
        self.committed = state
        if self._patients is not None:
            self._patients |= new_patients
        self._counts = counts if counts is not None else self._counts

    # ---- the counts kept in commit.json (ecgplat.store.sealed_counts) ------------------------
    def _load_counts(self, view=None) -> dict:
        """The counts at the last commit: the stored counts when they verify, else tallied
        from the columns (a store written by code that did not keep them, or left by a forget
        killed before it recounted)."""
        view = view or open_store(self.path)
        self._forgotten = view.tombstones
        self._counts = view.stored_counts() or view.count()
        return self._counts

    def _live_patients(self) -> set[str]:
        view = open_store(self.path)
        return set(view.column("patient_key")[view.live].tolist()) if view.n_records else set()

    def _next_counts(self, split_counts: dict | None) -> tuple[dict | None, set[str]]:
        """The counts after this commit and the patient keys it adds; (None, ..) when it
        changes no count (nothing staged, no new split)."""

        def staged(key: str, dtype=object) -> np.ndarray:  # only the columns the counts need
            parts = self._staged.get(key)
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

        records, reasons = staged("records/source"), staged("rejects/reason")
        if not len(records) and not len(reasons) and split_counts is None:
            return None, set()
        counts = self._counts if self._counts is not None else self._load_counts()
        new_patients: set[str] = set()
        if len(records):
            if self._patients is None:
                self._patients = self._live_patients()
            new_patients = set(staged("records/patient_key").tolist()) - self._patients
        counts = C.add_rows(
            counts,
            records,
            staged("records/seg_count", np.int32),
            len(new_patients),
            (C.reason_kind(r) for r in reasons),
        )
        return dict(counts, **(split_counts or {})), new_patients

    def recount(self) -> None:
        """Tally the counts from the columns and commit them, unless the stored ones still
        verify (a forget changed the tombstone table: the counts it invalidated are redone)."""
        if self._staged or self.n_records != int(self.committed["n_records"]):
            raise RuntimeError(f"{self.path}: uncommitted records pending; commit first")
        view = open_store(self.path)
        if view.stored_counts() is not None:
            return
        self._patients = None
        state = dict(self.committed)
        state[C.COUNTS_KEY] = C.seal(self._load_counts(view), state, self._forgotten, self.secret)
        atomic.write_json(self.path / S.COMMIT_FILE, state, sort_keys=True)
        self.committed = state

    def write_splits(self, split, ident_split) -> None:
        """Replace the split assignment of all committed records atomically (a new generation
        under ``splits/``, switched to by one commit). The generation before it stays on disk
        for readers that opened the store earlier; older ones are then deleted."""
        n = int(self.committed["n_records"])
        if len(split) != n or len(ident_split) != n:
            raise ValueError(f"{self.path}: split arrays must have {n} entries")
        if self.n_records != n:
            raise RuntimeError(f"{self.path}: uncommitted records pending; commit first")
        old = self.committed.get("splits")
        k = int(old[1:]) + 1 if old else 1
        generation = f"g{k}"
        group = self.root.require_group(f"splits/{generation}")
        rows = max(1, min(n, SPLIT_CHUNK))
        for name, values in (("split", split), ("ident_split", ident_split)):
            arr = group.create_array(name, shape=(n,), chunks=(rows,), dtype=str, overwrite=True)
            for s in range(0, n, rows):  # chunk by chunk: memory bounded by one chunk's strings
                arr[s : s + rows] = _str_array(values[s : s + rows])
        live = open_store(self.path).live  # forgotten records count nowhere
        split_counts = {
            "per_split": C.value_counts(np.asarray(split, dtype=object)[live], C.UNASSIGNED),
            "per_ident_split": C.value_counts(
                np.asarray(ident_split, dtype=object)[live], C.NO_IDENT
            ),
        }
        self.commit(splits=generation, split_counts=split_counts)
        drop_generations(self.path, keep_below=k + 1)

    def close(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()
            self._lock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
