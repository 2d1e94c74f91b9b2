"""Opening a store for its one writer: creating it (or finishing an interrupted creation) and
recovering it to its commit point, so that appends start right past the committed counts.

Everything a writer appends goes past the counts of ``commit.json`` (``ecgplat.store.writer``),
so a writer killed at any moment leaves a store whose visible content is its last commit, plus
whole files past it: zarr 3.1's LocalStore writes each chunk/shard and each ``zarr.json``
through a ``*.partial`` file + rename, ecgplat's own files go through ``.*.tmp`` files, so no
file is ever half-written. Recovery truncates every array back to the committed counts and
removes those leftovers and the split generations that were never committed. Layout:
docs/formats.md.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import secrets
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from ecgplat import atomic
from ecgplat.leads import LEADS
from ecgplat.store import schema as S
from ecgplat.store.read import appended_arrays, check_lengths, commit_file, read_commit
from ecgplat.store.segment_codec import ShardFiles, codecs, direct_layout

if TYPE_CHECKING:
    import zarr

_SEG_SHAPE = (S.N_LEADS, S.SEGMENT_SAMPLES)
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


def open_at_commit(path: Path, create: bool) -> tuple[S.StoreLock, zarr.Group, dict]:
    """(the store's lock, its root group, its commit point) of the store at ``path``, locked,
    complete and recovered to its last commit. A store is created there when there is none
    and ``create`` (FileNotFoundError otherwise); ValueError for a path that holds something
    else; StoreBusyError when another process writes the store."""
    import zarr

    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a directory")
    is_store = (path / "zarr.json").is_file()
    if not is_store:
        if not create:
            raise FileNotFoundError(f"{path}: no ecgplat store here")
        if path.exists() and any(p.name != ".lock" for p in path.iterdir()):
            raise ValueError(f"{path}: directory is not empty and is not an ecgplat store")
    path.mkdir(parents=True, exist_ok=True)
    lock = S.StoreLock(path)
    try:
        root = zarr.open_group(str(path), mode="a")
        version = root.attrs.get("schema_version")
        if is_store and version is None and not _only_own_entries(path):
            raise ValueError(f"{path}: a zarr group that is not an ecgplat store")
        if is_store and version not in (None, S.SCHEMA_VERSION):
            raise ValueError(f"{path}: schema_version {version!r} is not {S.SCHEMA_VERSION}")
        _create_missing(path, root)
        committed = read_commit(path)
        _recover(path, root, committed)
    except BaseException:
        lock.release()
        raise
    return lock, root, committed


def _only_own_entries(path: Path) -> bool:
    """True for a store whose creation was interrupted (nothing but our own entries)."""
    return all(
        p.name in _OWN_ENTRIES or p.name.endswith((".tmp", ".partial")) for p in path.iterdir()
    )


def _refuse_new_key_for_old_records(path: Path) -> None:
    """A store that already holds records or rejects must never get a fresh key: every
    patient would get a new pseudonym and every record would be ingested again."""
    try:
        state = read_commit(path)
        held = state["n_records"] + state["n_rejects"]
    except ValueError:
        held = 1  # unreadable commit point: assume the store is not empty
    if held:
        raise ValueError(
            f"{path / S.SECRET_FILE}: the pseudonymisation key is missing but the store "
            "already holds records; restore secret.key from your backup of this store "
            "(a new key would give every patient a new pseudonym and duplicate every record)"
        )


def _create_missing(path: Path, root: zarr.Group) -> None:
    """Create whatever a (possibly half-created) store lacks; never touches existing data."""
    secret_file = path / S.SECRET_FILE
    if not secret_file.exists():
        _refuse_new_key_for_old_records(path)
        atomic.write_bytes(secret_file, secrets.token_bytes(32), mode=0o600)
    filters, compressors = codecs()

    def exists(key: str) -> bool:  # not group listing: it warns about our non-zarr files
        return (path / key / "zarr.json").is_file()

    if not exists("segments"):
        root.create_array(
            "segments",
            shape=(0, *_SEG_SHAPE),
            dtype=S.DTYPE,
            chunks=(S.SEGMENT_CHUNK, *_SEG_SHAPE),
            shards=(S.SEGMENT_SHARD, *_SEG_SHAPE),
            filters=filters,
            compressors=compressors,
            fill_value=0,
        )
    for name, dtype in (("segment_record", "int64"), ("segment_number", "int32")):
        if not exists(name):
            root.create_array(name, shape=(0,), dtype=dtype, chunks=(65536,))
    records = root.require_group("records")
    held = read_commit(path)["n_records"]  # zeros without a commit point
    for name, dtype, shape in S.RECORD_COLUMNS:
        if not exists(f"records/{name}"):
            # a column added after the store was written covers its rows: they read as the
            # column's default (S.ADDED_COLUMNS), not as missing rows
            records.create_array(
                name,
                shape=(held if name in S.ADDED_COLUMNS else 0, *shape),
                chunks=(S.RECORD_CHUNK, *shape),
                dtype=str if dtype == "str" else dtype,
            )
    rejects = root.require_group("rejects")
    for name in S.REJECT_COLUMNS:
        if not exists(f"rejects/{name}"):
            rejects.create_array(name, shape=(0,), chunks=(S.RECORD_CHUNK,), dtype=str)
    root.require_group("splits")
    if "schema_version" not in root.attrs:
        root.attrs.update(
            {
                "schema_version": S.SCHEMA_VERSION,
                "sample_rate": S.SAMPLE_RATE,
                "segment_samples": S.SEGMENT_SAMPLES,
                "segment_seconds": S.SEGMENT_SECONDS,
                "leads": list(LEADS),
                "units": S.UNITS,
                "dtype": S.DTYPE,
                "store_uuid": uuid.uuid4().hex,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            }
        )
    if not (path / S.COMMIT_FILE).exists():
        atomic.write_json(
            path / S.COMMIT_FILE,
            {"n_records": 0, "n_segments": 0, "n_rejects": 0, "splits": None},
            sort_keys=True,
        )


def _recover(path: Path, root: zarr.Group, committed: dict) -> None:
    """Drop everything past the commit point: truncate arrays, delete split generations
    that are neither kept nor committed, and zarr temp files. ValueError, with nothing changed,
    when the commit point counts rows that an array does not hold (never grown to fit)."""
    check_lengths(root, committed, commit_file(path))
    for key, _, n in appended_arrays(committed):
        arr = S.zarr_array(root, key)
        if arr.shape[0] != n:
            arr.resize((n, *arr.shape[1:]))
    drop_generations(path, keep_below=S.generation_number(committed.get("splits")) + 1)
    if direct_layout(root["segments"]):
        ShardFiles(path, 0).drop_beyond(int(committed["n_segments"]))
    # zarr's *.partial and ecgplat.atomic's .*.tmp files; os.walk, not Path.rglob, which
    # keeps every path it yielded (10 MB at 500,000 segments)
    for folder, _, names in os.walk(path):
        for name in names:
            tmp = Path(folder, name)
            if name.endswith(".partial") or atomic.is_temp(tmp):
                tmp.unlink(missing_ok=True)


def drop_generations(path: Path, keep_below: int) -> None:
    """Delete split generations numbered ``>= keep_below`` (never committed) or older than
    the last ``S.SPLITS_KEPT`` below it (no reader can still be reading those)."""
    splits_dir = path / "splits"
    for child in splits_dir.iterdir() if splits_dir.is_dir() else ():
        k = S.generation_number(child.name) if re.fullmatch(r"g[0-9]+", child.name) else None
        if child.is_dir() and k is not None and not keep_below - S.SPLITS_KEPT <= k < keep_below:
            shutil.rmtree(child, ignore_errors=True)
