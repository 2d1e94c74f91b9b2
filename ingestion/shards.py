"""Export a split of the store as WebDataset tar shards for streaming training.

One sample per record, in record-index order; the shard format and the ``_info.json`` manifest
are defined in ``ecgplat.shard_format`` and documented in docs/formats.md ("Shards").

A re-export is atomic as a whole: the exporter holds ``DIR/.lock``, deletes the temporary files
of killed runs, writes every shard under a temporary name, withdraws the export's old manifest
entry, renames the shards into place and then writes the new entry (the manifest, last). A run
killed at any point leaves either the old export, or none under that name (training then
refuses it), never a manifest listing a mix of old and new shards.

An export to object storage (``--out s3://bucket/prefix``) writes the same tar bytes (members
carry the store's creation time, so an export depends only on the store and its parameters).
Objects cannot be renamed, so it holds the lock object ``PREFIX/.lock``
(`ecgplat.locks.ObjectLock`), withdraws the export's old manifest entry first, builds each shard
in a local temporary file and uploads it to its final object when it is closed (each upload
appears whole or not at all), and writes ``_info.json`` last: a killed run leaves no export under
that name, never a mix.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np

from ecgplat import atomic
from ecgplat.faults import stop_point
from ecgplat.locks import ObjectLock, WriterLock
from ecgplat.progress import ProgressBar
from ecgplat.shard_format import (
    FORMAT,
    INFO_FILE,
    LOCK_FILE,
    META_MEMBER,
    SAMPLE_SCHEMA,
    SEG_MEMBER,
    listed_urls,
    read_info,
    sample_key,
    shard_glob,
    shard_name,
)
from ecgplat.store import EcgStore, is_url, open_store

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


class _ShardSink:
    """Writes tar shards ``name-%06d.tar`` with rotation, each via a temp file."""

    def __init__(self, out: Path, name: str, max_size: int, max_count: int, mtime: int = 0):
        self.out, self.name, self.max_size, self.max_count = out, name, max_size, max_count
        self.mtime = mtime  # of every member: the store's creation time (reproducible bytes)
        self.shards: list[dict] = []
        self.temps: list[Path] = []
        self.tar: tarfile.TarFile | None = None

    def _open(self) -> None:
        index = len(self.shards)
        final = self.out / shard_name(self.name, index)
        self.temps.append(atomic.temp_name(final))
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
        assert self.tar is not None  # still open, or opened just above
        for suffix, data in payloads.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), self.mtime, 0o644
            self.tar.addfile(info, io.BytesIO(data))
        entry["samples"] += 1
        entry["segments"] += n_segments
        entry["bytes"] += size

    def finish(self) -> list[dict]:
        """Close the last shard and fsync every temporary file (nothing renamed yet)."""
        self._close()
        for tmp in self.temps:
            atomic.fsync_file(tmp)
        return self.shards

    def publish(self) -> None:
        """Move the finished shards into place (renames only), then fsync the folder."""
        for n, (tmp, entry) in enumerate(zip(self.temps, self.shards, strict=True)):
            os.replace(tmp, self.out / entry["file"])
            if n == 0:
                stop_point("shards.between_renames")
        atomic.fsync_dir(self.out)
        self.temps = []

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None
        for tmp in self.temps:
            tmp.unlink(missing_ok=True)


class _UploadSink(_ShardSink):
    """Shards built one at a time in the local folder ``staging`` and uploaded to their final
    objects under ``base`` of the file system ``fs`` as each is closed (then deleted here)."""

    def __init__(self, fs, base: str, staging: Path, name: str, max_size, max_count, mtime):
        super().__init__(staging, name, max_size, max_count, mtime)
        self.fs, self.base = fs, base

    def _close(self) -> None:
        if self.tar is None:
            return
        super()._close()
        tmp = self.temps.pop()
        self.fs.put_file(str(tmp), f"{self.base}/{self.shards[-1]['file']}")
        tmp.unlink()

    def finish(self) -> list[dict]:
        self._close()
        return self.shards


def _iter_samples(store: EcgStore, indices: np.ndarray, block: int = 256):
    """(record_index, int16 segments, meta) for ``indices``, reading the store in blocks."""
    frame = store.records
    labels, masks = store.labels, store.lead_masks
    for start in range(0, len(indices), block):
        part = indices[start : start + block]
        starts = frame["seg_start"].to_numpy()[part]
        counts = frame["seg_count"].to_numpy()[part]
        seg_idx = np.concatenate([np.arange(s, s + c) for s, c in zip(starts, counts, strict=True)])
        data = store.read_segments_raw(seg_idx)
        offset = 0
        for i, c in zip(part, counts, strict=True):
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
    params = (name, max_size, max_count, _member_mtime(reader))
    if is_url(out):
        return _write_remote(reader, store, split, indices, str(out), params, progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _export_lock(out):
        # temporary files of killed runs (nobody else can be writing here now)
        atomic.remove_temps(out, "*.tar")
        atomic.remove_temps(out, INFO_FILE)
        sink = _ShardSink(out, *params)
        shards = _fill(sink, reader, indices, progress)
        entry = _entry(reader, store, split, shards, max_size, max_count)
        _publish(out, name, sink, entry)
    return entry


def _member_mtime(reader: EcgStore) -> int:
    """The store's creation time (epoch seconds; 0 when unrecorded): every member's mtime."""
    try:
        return max(0, int(_dt.datetime.fromisoformat(str(reader.attrs["created"])).timestamp()))
    except (KeyError, TypeError, ValueError):
        return 0


def _fill(sink: _ShardSink, reader: EcgStore, indices: np.ndarray, progress: bool) -> list:
    """Write the samples of ``indices`` into ``sink``; its finished shard entries."""
    bar = ProgressBar(progress, len(indices), f"shards {sink.name}")
    try:
        for i, segs, meta in _iter_samples(reader, indices):
            seg_bytes, meta_bytes = sample_bytes(segs, meta)
            payloads = {SEG_MEMBER: seg_bytes, META_MEMBER: meta_bytes}
            sink.add(sample_key(i), payloads, len(segs))
            bar.advance()
        return sink.finish()
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()


def _write_remote(reader, store, split, indices, url: str, params: tuple, progress) -> dict:
    """The export to object storage (module docstring): lock object, old entry withdrawn,
    shards uploaded as they are closed, manifest last, old shards not reused deleted."""
    import tempfile

    import fsspec

    name, max_size, max_count, _ = params
    url = url.rstrip("/")
    fs, base = fsspec.core.url_to_fs(url)
    bucket = base.split("/", 1)[0]
    if not fs.exists(bucket):
        raise FileNotFoundError(f"{url}: bucket {bucket!r} does not exist (create it first)")
    with ObjectLock(url, f"{url}: shards are being written by another process"):
        info = read_info(url) or {}
        if name in info:  # its objects are about to be replaced: withdraw it first
            del info[name]
            _put_manifest(fs, base, info)
        with tempfile.TemporaryDirectory(prefix="ecgplat-shards-") as staging:
            sink = _UploadSink(fs, base, Path(staging), *params)
            shards = _fill(sink, reader, indices, progress)
        entry = _entry(reader, store, split, shards, max_size, max_count)
        stop_point("shards.before_manifest")
        info[name] = entry
        _put_manifest(fs, base, info)
        keep = {s["file"] for s in entry["shards"]}
        for old in fs.glob(f"{base}/{shard_glob(name)}"):
            if old.rsplit("/", 1)[-1] not in keep:
                fs.rm_file(old)
    return entry


def _put_manifest(fs, base: str, info: dict) -> None:
    """``_info.json`` on object storage: one PUT, which appears whole or not at all."""
    fs.pipe_file(f"{base}/{INFO_FILE}", json.dumps(info, indent=1, sort_keys=True).encode())


def _entry(reader: EcgStore, store, split: str, shards: list, max_size: int, max_count: int):
    return {
        "format": FORMAT,
        "split": split,
        "shards": shards,
        "samples": int(sum(s["samples"] for s in shards)),
        "segments": int(sum(s["segments"] for s in shards)),
        "sample_schema": SAMPLE_SCHEMA,
        "params": {"max_size": max_size, "max_count": max_count},
        "store": {
            "path": str(store).rstrip("/") if is_url(store) else str(Path(store).resolve()),
            "uuid": reader.attrs.get("store_uuid"),
            "n_records": reader.n_records,
            "split_generation": reader.split_generation,
            "forget_generation": reader.forget_generation,
        },
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _publish(out: Path, name: str, sink: _ShardSink, entry: dict) -> None:
    """Withdraw the old entry of ``name``, rename the new shards into place, write the new
    entry (the manifest last), then delete old shards the new export does not reuse."""
    info = read_info(out) or {}
    if name in info:
        del info[name]
        atomic.write_json(out / INFO_FILE, info, indent=1, sort_keys=True)
    stop_point("shards.before_renames")
    sink.publish()
    stop_point("shards.before_manifest")
    info[name] = entry
    atomic.write_json(out / INFO_FILE, info, indent=1, sort_keys=True)
    keep = {s["file"] for s in entry["shards"]}
    for old in out.glob(shard_glob(name)):
        if old.name not in keep:
            old.unlink()


def _export_lock(out: Path) -> WriterLock:
    """The shard directory's single-writer lock (``DIR/.lock``: one exporter at a time)."""
    return WriterLock(out / LOCK_FILE, f"{out}: shards are being written by another process")


def shard_urls(out: str | os.PathLike, name: str) -> list[str]:
    """Paths of the shards of export ``name`` listed in ``_info.json``."""
    return listed_urls(out, name)
