"""The WebDataset shard format shared by the exporter (`ingestion.shards`) and the training
reader (`training.data`): file and member names, the `_info.json` manifest and its checks.

The layout is documented once, in docs/formats.md ("Shards").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

INFO_FILE = "_info.json"
LOCK_FILE = ".lock"  # held by the exporter while it writes a shard directory
FORMAT = "ecgplat-shards/1"
KEY_FORMAT = "r{:08d}"  # sample key: the record index, never a patient id
SEG_MEMBER = "seg.npy"  # int16 (S, 12, 2500) microvolts
META_MEMBER = "meta.json"
META_FIELDS = (
    "record_key",
    "patient_key",
    "source",
    "split",
    "labels",
    "lead_mask",
    "record_index",
)
META_REQUIRED = ("record_key", "patient_key", "labels", "lead_mask", "record_index")
SAMPLE_SCHEMA = {
    "key": "r%08d (record index)",
    SEG_MEMBER: "int16 (S, 12, 2500) microvolts, leads I..V6, absent leads 0",
    META_MEMBER: list(META_FIELDS),
}


class StaleShardsError(ValueError):
    """Shards exported under another split generation than the store's current one."""


def shard_name(name: str, index: int) -> str:
    """File name of shard ``index`` of export ``name``: ``name-000000.tar``."""
    return f"{name}-{index:06d}.tar"


def shard_glob(name: str) -> str:
    return f"{name}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"


def sample_key(record_index: int) -> str:
    return KEY_FORMAT.format(int(record_index))


def read_info(base: str | os.PathLike) -> dict | None:
    """The parsed `_info.json` of a shard directory (local path or fsspec URL), or None when it
    does not exist; ValueError naming the file when it is not a JSON object."""
    base = str(base)
    if "://" in base:
        import fsspec

        where = base.rstrip("/") + "/" + INFO_FILE
        fs, path = fsspec.core.url_to_fs(where)
        if not fs.exists(path):
            return None
        with fs.open(path, "rb") as f:
            raw = f.read()
    else:
        file = Path(base) / INFO_FILE
        if not file.exists():
            return None
        where, raw = str(file), file.read_bytes()
    try:
        info = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: corrupt shard manifest ({e})") from None
    if not isinstance(info, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("shards"), list) for v in info.values()
    ):
        raise ValueError(f"{where}: not an ecgplat shard manifest (expected name -> export)")
    return info


def export_entry(info: dict, name: str, where: str) -> dict:
    """The manifest entry of export ``name``; ValueError listing the names there are."""
    if name not in info:
        have = ", ".join(sorted(info)) or "nothing"
        raise ValueError(f"{where}: no split '{name}' in {INFO_FILE} (has: {have})")
    return info[name]


def listed_urls(base: str | os.PathLike, name: str) -> list[str]:
    """Paths (or URLs) of the shards of export ``name`` as listed in ``base/_info.json``."""
    info = read_info(base)
    if info is None:
        raise FileNotFoundError(f"{base}: no {INFO_FILE} (write shards with `ecgplat shards`)")
    entry = export_entry(info, name, str(base))
    root = str(base).rstrip("/")
    return [f"{root}/{s['file']}" for s in entry["shards"]]


def check_current(base: str | os.PathLike, names, allow_stale: bool = False) -> None:
    """Refuse exports in ``base`` whose split generation is not the current one of the store
    they were written from, or that were written before a later ``ecgplat forget`` (its forget
    generation moved on: the export may hold withdrawn records); StaleShardsError naming the
    export and both generations.

    ``base`` may be a shard folder's URL (an export to object storage) and the recorded store a
    store's URL. Exports of every record (``split == "all"``) are checked for forgets only;
    exports whose store is no longer at the recorded path (shards copied elsewhere) cannot be
    checked and pass."""
    from ecgplat.store import is_url, read_commit, read_forgotten, store_file

    if allow_stale or not (is_url(base) or Path(base).is_dir()):
        return
    info = read_info(base) or {}
    manifest = f"{str(base).rstrip('/')}/{INFO_FILE}"
    for name in names:
        entry = info.get(name)
        src = (entry or {}).get("store") or {}
        store = src.get("path") or ""
        if not entry or not store or store_file(store, "zarr.json") is None:
            continue
        forgotten, written = read_forgotten(store)["generation"], src.get("forget_generation", 0)
        if forgotten != written:
            raise StaleShardsError(
                f"{manifest}: export '{name}' was written before `ecgplat forget` "
                f"withdrew records from {store} (forget generation {written}, store at "
                f"{forgotten}); re-run `ecgplat shards` (or pass --allow-stale)"
            )
        if entry.get("split") == "all":
            continue
        current = read_commit(store).get("splits")
        written = src.get("split_generation", "unrecorded")
        if written != current:
            raise StaleShardsError(
                f"{manifest}: export '{name}' was written under split generation "
                f"{written} but {store} is now at {current}; re-run `ecgplat shards` "
                "(or pass --allow-stale)"
            )
