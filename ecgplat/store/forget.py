"""Withdrawing records from a store (`ecgplat forget`): tombstones first, then the data files.

A forget runs under the store's writer lock in two phases (layout: docs/formats.md, "Forgotten
records"):

1. **Mask** (the commit point): the records are appended to the tombstone table
   ``STORE/forgotten.json`` and its ``generation`` is bumped, in one atomic file replacement.
   From then on the read API never returns them (``ecgplat.store``), shard exports and FAISS
   indexes that recorded an older generation are refused as stale, and later exports skip them.
2. **Scrub**: the data files that held them are rewritten so that their bytes are gone from
   disk: the given FAISS index files lose their rows, every feature set its embedding rows
   (zeroed), every task file (``STORE/tasks``) its label rows, the ``segments`` shard files
   their chunks (absent chunks read as 0; the other chunks keep their exact bytes), the
   rejects of the same files their path and reason, and the record rows every identifying
   column (a tombstone row keeps only ``source``,
   ``path_hash``, ``seg_start`` and ``seg_count``, so row numbers stay stable and a re-ingest of
   the same files skips them). Each step is idempotent; ``scrubbed = generation`` is written last,
   then the counts kept in ``commit.json`` are recounted (``StoreWriter.recount``).

A process killed in phase 1 leaves the store as before; killed in phase 2 it leaves the records
masked with ``forget_pending`` set (``ecgplat info`` says so), and any rerun of ``ecgplat forget``
on the store completes the scrub. Nothing identifying is logged or printed: counts only.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ecgplat import atomic
from ecgplat.faults import stop_point
from ecgplat.privacy import tombstone_hash
from ecgplat.store import schema as S
from ecgplat.store.read import open_store, read_forgotten
from ecgplat.store.segment_codec import ShardFiles, direct_layout
from ecgplat.store.task_store import scrub_tasks
from ecgplat.store.writer import StoreWriter

log = logging.getLogger(__name__)

PATIENT_KEY = re.compile(r"p-[0-9a-f]{16}")
FORGOTTEN_REASON = "forgotten"  # a scrubbed reject row's reason
# values of a scrubbed record row; the columns not listed (source, path_hash, seg_start,
# seg_count) are kept: they identify nobody and keep row numbers and re-ingest skips working
TOMBSTONE = {
    "record_key": "",
    "record_id": "",
    "path": "",
    "patient_key": "",
    "fs_original": 0.0,
    "n_samples_original": 0,
    "age": np.nan,
    "sex": "",
    "raw_codes": "",
    "labels": False,
    "lead_mask": False,
    "strat_fold": -1,
    "units": "",
    "filter": "",
    "derived_mask": False,
}


def forget(
    store: str | os.PathLike,
    record: str | None = None,
    patient: str | None = None,
    indexes=(),
) -> dict:
    """Forget the record with key ``record`` or every record of the patient key ``patient``
    (or, with neither, only complete a pending forget) and keep the FAISS indexes ``indexes``
    in step: `retrieval.index.ForgetIndex` objects, passed in by the caller since ingestion does
    not import retrieval (anything with ``check_store(reader)`` and ``scrub(key_hashes, secret,
    generation) -> rows removed``). Returns counts: {"forgotten", "already", "segments",
    "generation", "shard_files", "feature_sets", "task_files", "indexes", "index_rows",
    "records_total"}.

    ValueError/KeyError (one line, no identifier) for a bad or unknown key, or an index file
    that is not of this store; nothing is changed then."""
    if record is not None and patient is not None:
        raise ValueError("give one of --record KEY or --patient PSEUDONYM, not both")
    if patient is not None and not PATIENT_KEY.fullmatch(patient):
        raise ValueError(
            "--patient: not a patient pseudonym (p- and 16 hex digits, as in the store's "
            "patient_key column; raw patient ids are never accepted)"
        )
    store = Path(store)
    with StoreWriter(store, create=False) as writer:  # the lock, and the store at its commit
        reader = open_store(store, mode="r+")
        secret = writer.secret
        table = read_forgotten(store)
        rows, already = _resolve(reader, table, secret, record, patient)
        for target in indexes:  # every index is checked before anything changes
            target.check_store(reader)
        if record is None and patient is None and not indexes and not reader.forget_pending:
            raise ValueError(
                f"{store}: give --record KEY or --patient PSEUDONYM (no forget is pending)"
            )
        n_segments = 0
        if len(rows):
            n_segments = int(np.asarray(reader.records["seg_count"])[rows].sum())
            table = _mask(store, table, reader, rows, secret, by_patient=patient is not None)
            log.info(
                "forget generation %d: %d records (%d segments) masked",
                table["generation"],
                len(rows),
                n_segments,
            )
        stop_point("forget.after_mask")
        done = _scrub(store, reader, table, secret, indexes)
        writer.recount()  # the counts in commit.json, without the forgotten records
    return {
        "forgotten": len(rows),
        "already": already,
        "segments": n_segments,
        "generation": table["generation"],
        "records_total": len(table["records"]),
        **done,
    }


def _resolve(reader, table: dict, secret: bytes, record, patient) -> tuple[np.ndarray, int]:
    """(live record indices to forget, 1 if the key was forgotten before else 0)."""
    if record is None and patient is None:
        return np.zeros(0, dtype=np.int64), 0
    frame = reader.records
    if record is not None:
        rows = np.flatnonzero((frame["record_key"].to_numpy() == record) & reader.live)
        known = table["key_hash"]
        hashed, what = tombstone_hash("record", record, secret), "no record with the --record key"
    else:
        rows = np.flatnonzero((frame["patient_key"].to_numpy() == patient) & reader.live)
        known = table["patient_hash"]
        hashed, what = tombstone_hash("patient", patient, secret), "no records of the --patient"
    if len(rows) == 0 and hashed not in known:
        raise KeyError(f"{reader.path}: {what} (nothing was changed)")
    return rows.astype(np.int64), int(len(rows) == 0)


def _mask(store: Path, table: dict, reader, rows, secret: bytes, by_patient: bool) -> dict:
    """Phase 1: append ``rows`` to the tombstone table and bump its generation (one atomic
    replacement of forgotten.json: the commit point of the forget)."""
    keys = S.as_str_array(reader.root["records/record_key"][: reader.n_records])[rows]
    patients = S.as_str_array(reader.root["records/patient_key"][: reader.n_records])[rows]
    generation = table["generation"] + 1
    table = {k: list(v) if isinstance(v, list) else v for k, v in table.items()}
    table["records"] += [int(r) for r in rows]
    table["key_hash"] += [tombstone_hash("record", str(k), secret) for k in keys]
    # the patient hash only for a patient's withdrawal (it also scrubs rejects naming them)
    table["patient_hash"] += [
        tombstone_hash("patient", str(p), secret) if by_patient else "" for p in patients
    ]
    table["record_generation"] += [generation] * len(rows)
    table["generation"] = generation
    table["operations"].append(
        {
            "generation": generation,
            "by": "patient" if by_patient else "record",
            "records": len(rows),
            "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
    )
    atomic.write_json(store / S.FORGOTTEN_FILE, table, indent=0, sort_keys=True)
    return table


def _scrub(store: Path, reader, table: dict, secret: bytes, indexes) -> dict:
    """Phase 2: rewrite every data file holding records of a generation not yet scrubbed, then
    mark the table scrubbed. Each step is idempotent, so a rerun after a kill completes it."""
    done = {"shard_files": 0, "feature_sets": 0, "task_files": 0, "indexes": 0, "index_rows": 0}
    gen = np.asarray(table["record_generation"], dtype=np.int64)
    pending = np.asarray(table["records"], dtype=np.int64)[gen > table["scrubbed"]]
    keys = set(table["key_hash"])
    for target in indexes:
        done["index_rows"] += target.scrub(keys, secret, table["generation"])
        done["indexes"] += 1
        stop_point("forget.after_index")
    if not len(pending) and table["scrubbed"] == table["generation"]:
        return done
    done["feature_sets"] = _scrub_features(store, pending)
    done["task_files"] = scrub_tasks(store, pending)
    stop_point("forget.after_features")
    done["shard_files"] = _scrub_segments(store, reader, pending)
    patients = {
        h for h, g in zip(table["patient_hash"], gen, strict=True) if h and g > table["scrubbed"]
    }
    _scrub_rejects(store, reader, pending, patients, secret)
    stop_point("forget.before_records")
    _scrub_records(reader, pending)
    stop_point("forget.before_done")
    table = dict(table, scrubbed=table["generation"])
    atomic.write_json(store / S.FORGOTTEN_FILE, table, indent=0, sort_keys=True)
    log.info(
        "forget generation %d scrubbed: %d records, %d shard files, %d feature sets",
        table["generation"],
        len(pending),
        done["shard_files"],
        done["feature_sets"],
    )
    return done


def _same(values: np.ndarray, value) -> bool:
    if isinstance(value, float) and np.isnan(value):
        return bool(np.all(np.isnan(values)))
    return bool(np.all(values == value))


def _set_rows(arr, rows: np.ndarray, value) -> bool:
    """Set ``rows`` of a zarr array to ``value``, rewriting each chunk they touch once (zarr
    replaces a chunk file by a rename); False when nothing had to change."""
    rows = np.unique(rows[rows < arr.shape[0]])
    step, changed = arr.chunks[0], False
    for c in np.unique(rows // step):
        a, b = int(c) * step, min((int(c) + 1) * step, arr.shape[0])
        block = np.array(arr[a:b])
        sel = rows[(rows >= a) & (rows < b)] - a
        if _same(block[sel], value):
            continue
        block[sel] = value
        arr[a:b] = block
        changed = True
    return changed


def _scrub_features(store: Path, pending: np.ndarray) -> int:
    """Zero the embedding rows of ``pending`` records in every feature set; delete the
    temporary groups of killed embeds (they may hold such rows too)."""
    import zarr

    root, n = store / S.FEATURES_DIR, 0
    for child in sorted(root.iterdir()) if root.is_dir() else ():
        if child.name.startswith(".tmp-"):
            shutil.rmtree(child, ignore_errors=True)
            continue
        changed = False
        for level in ("segment", "record"):
            if not (child / level / "record_index" / "zarr.json").is_file():
                continue
            index = zarr.open_array(str(child / level / "record_index"), mode="r")
            rows = np.flatnonzero(np.isin(np.asarray(index[:]), pending))
            if len(rows):
                embedding = zarr.open_array(str(child / level / "embedding"), mode="r+")
                changed |= _set_rows(embedding, rows, 0.0)
        n += int(changed)
    return n


def _scrub_segments(store: Path, reader, pending: np.ndarray) -> int:
    """Remove the segment chunks of ``pending`` records from the shard files of ``segments``
    (absent chunks read as 0); returns how many files were rewritten."""
    starts = np.asarray(reader.root["records/seg_start"][: reader.n_records])[pending]
    counts = np.asarray(reader.root["records/seg_count"][: reader.n_records])[pending]
    first = np.cumsum(counts) - counts  # segment rows of the pending records, in order
    seg = (np.repeat(starts, counts) + np.arange(counts.sum()) - np.repeat(first, counts)).astype(
        np.int64
    )
    arr = reader.root["segments"]
    if not direct_layout(arr):  # an older store's layout: through zarr (all-zero chunks dropped)
        for s, c in zip(starts, counts, strict=True):
            arr[int(s) : int(s) + int(c)] = 0
        return len(np.unique(seg // S.SEGMENT_SHARD))
    files, n = ShardFiles(store, 0), 0
    for k in np.unique(seg // S.SEGMENT_SHARD):
        if files.clear(int(k), (seg[seg // S.SEGMENT_SHARD == k] % S.SEGMENT_SHARD).tolist()):
            n += 1
            stop_point("forget.after_first_shard")
    return n


def _scrub_rejects(store: Path, reader, pending, patient_hashes: set, secret: bytes) -> None:
    """Blank path and reason of the rejects of the same files (by ``path_hash``) and, for a
    patient's withdrawal, of every reject naming their pseudonym."""
    n = reader.n_rejects
    if n == 0:
        return
    hashes = set(
        S.as_str_array(reader.root["records/path_hash"][: reader.n_records])[pending].tolist()
    )
    paths = S.as_str_array(reader.root["rejects/path"][:n])
    reasons = S.as_str_array(reader.root["rejects/reason"][:n])
    ours = np.isin(S.as_str_array(reader.root["rejects/path_hash"][:n]), list(hashes))
    if patient_hashes:
        for i, text in enumerate(paths + " " + reasons):
            tokens = PATIENT_KEY.findall(text)
            ours[i] |= any(tombstone_hash("patient", t, secret) in patient_hashes for t in tokens)
    rows = np.flatnonzero(ours)
    if len(rows):
        _set_rows(reader.root["rejects/path"], rows, "")
        _set_rows(reader.root["rejects/reason"], rows, FORGOTTEN_REASON)


def _scrub_records(reader, pending: np.ndarray) -> None:
    """Replace the identifying columns of the ``pending`` record rows by tombstone values."""
    for name, value in TOMBSTONE.items():
        if (reader.path / "records" / name / "zarr.json").is_file():
            _set_rows(reader.root[f"records/{name}"], pending, value)
