"""Export a split of the store as WebDataset tar shards for streaming training.

``DIR/<name>-000000.tar, ...``: one sample per record, in record-index order, key ``r%08d`` (the
record index; never a patient id), members ``<key>.seg.npy`` (int16 (S, 12, 2500) microvolts)
and ``<key>.meta.json`` (record_key, patient_key, source, split, labels [26], lead_mask [12],
record_index). A shard is closed when adding a sample would pass ``max_size`` bytes or when it
holds ``max_count`` samples.

``DIR/_info.json`` maps each export name to::

    {"format": "ecgplat-shards/1", "split": ..., "shards": [{"file", "samples", "segments",
     "bytes"}], "samples": N, "segments": M, "sample_schema": {...},
     "params": {"max_size", "max_count"}, "store": {"path", "uuid", "n_records"}, "created"}

Every file is written under a temporary name and renamed into place; ``_info.json`` is merged
(other names kept) and replaced atomically last, and shards of an older export with the same
name that the new one does not reuse are removed afterwards.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import re
import tarfile
import time
import uuid
from pathlib import Path

import numpy as np

from ecgplat.progress import ProgressBar
from ecgplat.store import EcgStore, open_store

INFO_FILE = "_info.json"
FORMAT = "ecgplat-shards/1"
SAMPLE_SCHEMA = {
    "key": "r%08d (record index)",
    "seg.npy": "int16 (S, 12, 2500) microvolts, leads I..V6, absent leads 0",
    "meta.json": [
        "record_key",
        "patient_key",
        "source",
        "split",
        "labels",
        "lead_mask",
        "record_index",
    ],
}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str | int) -> int:
    """Bytes from ``"256MB"``, ``"1.5GiB"``, ``"4096"``."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"bad size {text!r}; use e.g. 256MB, 1GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def sample_bytes(segments: np.ndarray, meta: dict) -> tuple[bytes, bytes]:
    """The ``seg.npy`` and ``meta.json`` payloads of one sample."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(segments, dtype=np.int16), allow_pickle=False)
    return buf.getvalue(), json.dumps(meta, sort_keys=True).encode()


def _atomic_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


class _ShardSink:
    """Writes tar shards ``name-%06d.tar`` with rotation, each via a temp file."""

    def __init__(self, out: Path, name: str, max_size: int, max_count: int):
        self.out, self.name, self.max_size, self.max_count = out, name, max_size, max_count
        self.shards: list[dict] = []
        self.temps: list[Path] = []
        self.tar = None

    def _open(self) -> None:
        index = len(self.shards)
        final = self.out / f"{self.name}-{index:06d}.tar"
        self.temps.append(self.out / f".{final.name}.{uuid.uuid4().hex}.tmp")
        self.tar = tarfile.open(self.temps[-1], "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.shards.append({"file": final.name, "samples": 0, "segments": 0, "bytes": 0})

    def _close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.shards[-1]["bytes"] = self.temps[-1].stat().st_size
        self.tar = None

    def add(self, key: str, payloads: dict[str, bytes], n_segments: int) -> None:
        size = sum(512 + len(v) + 511 for v in payloads.values())  # tar header + padding
        entry = self.shards[-1] if self.tar is not None else None
        if (
            entry is not None
            and entry["samples"]
            and (entry["samples"] >= self.max_count or entry["bytes"] + size > self.max_size)
        ):
            self._close()
            entry = None
        if entry is None:
            self._open()
            entry = self.shards[-1]
        mtime = time.time()
        for suffix, data in payloads.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), mtime, 0o644
            self.tar.addfile(info, io.BytesIO(data))
        entry["samples"] += 1
        entry["segments"] += n_segments
        entry["bytes"] += size

    def finish(self) -> list[dict]:
        """Close the last shard and move all shards into place (renames only, after every
        shard is complete on disk)."""
        self._close()
        for tmp, entry in zip(self.temps, self.shards):
            _atomic_replace(tmp, self.out / entry["file"])
        self.temps = []
        return self.shards

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None
        for tmp in self.temps:
            tmp.unlink(missing_ok=True)


def _iter_samples(store: EcgStore, indices: np.ndarray, block: int = 256):
    """(record_index, int16 segments, meta) for ``indices``, reading the store in blocks."""
    frame = store.records
    labels, masks = store.labels, store.lead_masks
    for start in range(0, len(indices), block):
        part = indices[start : start + block]
        starts = frame["seg_start"].to_numpy()[part]
        counts = frame["seg_count"].to_numpy()[part]
        seg_idx = np.concatenate([np.arange(s, s + c) for s, c in zip(starts, counts)])
        data = store.read_segments_raw(seg_idx)
        offset = 0
        for i, c in zip(part, counts):
            row = frame.iloc[int(i)]
            meta = {
                "record_key": row["record_key"],
                "patient_key": row["patient_key"],
                "source": row["source"],
                "split": row["split"],
                "labels": [int(v) for v in labels[i]],
                "lead_mask": [int(v) for v in masks[i]],
                "record_index": int(i),
            }
            yield int(i), data[offset : offset + c], meta
            offset += c


def read_info(out: str | os.PathLike) -> dict:
    """The ``_info.json`` of a shard directory ({} if none)."""
    file = Path(out) / INFO_FILE
    return json.loads(file.read_text()) if file.exists() else {}


def write_shards(
    store: str | os.PathLike,
    split: str,
    out: str | os.PathLike,
    name: str | None = None,
    max_size: int | str = "256MB",
    max_count: int = 100_000,
    progress: bool = False,
) -> dict:
    """Export the records of ``split`` ("all" = every record) to shards; returns the
    ``_info.json`` entry written for ``name`` (default: the split name)."""
    name = name or split
    if not _NAME_RE.match(name):
        raise ValueError(f"bad shard name {name!r}: use letters, digits, '_', '-', '.'")
    max_size = parse_size(max_size)
    if max_size < 1 or max_count < 1:
        raise ValueError("max_size and max_count must be >= 1")
    reader = open_store(store)
    indices = reader.select() if split == "all" else reader.select(split=split)
    if len(indices) == 0:
        raise ValueError(f"{store}: no records in split {split!r} (run `ecgplat split` first?)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sink = _ShardSink(out, name, max_size, max_count)
    bar = ProgressBar(progress, len(indices), f"shards {name}")
    try:
        for i, segs, meta in _iter_samples(reader, indices):
            seg_bytes, meta_bytes = sample_bytes(segs, meta)
            sink.add(f"r{i:08d}", {"seg.npy": seg_bytes, "meta.json": meta_bytes}, len(segs))
            bar.advance()
        shards = sink.finish()
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    entry = {
        "format": FORMAT,
        "split": split,
        "shards": shards,
        "samples": int(sum(s["samples"] for s in shards)),
        "segments": int(sum(s["segments"] for s in shards)),
        "sample_schema": SAMPLE_SCHEMA,
        "params": {"max_size": max_size, "max_count": max_count},
        "store": {
            "path": str(Path(store).resolve()),
            "uuid": reader.attrs.get("store_uuid"),
            "n_records": reader.n_records,
        },
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    info = read_info(out)
    info[name] = entry
    tmp = out / f".{INFO_FILE}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    _atomic_replace(tmp, out / INFO_FILE)
    keep = {s["file"] for s in shards}
    for old in out.glob(f"{name}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if old.name not in keep:
            old.unlink()
    return entry


def shard_urls(out: str | os.PathLike, name: str) -> list[str]:
    """Paths of the shards of export ``name`` listed in ``_info.json``."""
    info = read_info(out)
    if name not in info:
        raise KeyError(f"{out}: no shards named {name!r} in {INFO_FILE}")
    return [str(Path(out) / s["file"]) for s in info[name]["shards"]]
