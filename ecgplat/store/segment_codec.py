"""The on-disk encoding of the store's ``segments`` array, written without going through zarr.

Each 5 s segment is one zarr chunk (delta filter -> little-endian int16 bytes -> Blosc, the
codecs declared in the array metadata by ``codecs()``). ``encode_segments`` runs on the ingest
workers, so the driver only places ready bytes into shard files; ``ShardFiles`` writes those
files in the zarr v3 sharding format (chunk bytes, then the (chunks, 2) uint64 offset/length
index and its crc32c). ``direct_layout`` tells whether an existing array has exactly this
layout (a store created by an older version is appended to through zarr instead).
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np

from ecgplat import atomic
from ecgplat.store import schema as S

_SEG_SHAPE = (S.N_LEADS, S.SEGMENT_SAMPLES)


def codecs():
    """The zarr codecs of the ``segments`` array (metadata; ``encode_segments`` must produce
    exactly what they decode)."""
    from zarr.codecs import BloscCodec
    from zarr.codecs.numcodecs import Delta

    S.quiet_zarr_warnings()
    filters = [Delta(dtype="int16")] if S.SEGMENT_DELTA else []
    return filters, [
        BloscCodec(
            cname=S.SEGMENT_CNAME, clevel=S.SEGMENT_CLEVEL, shuffle=S.SEGMENT_SHUFFLE, typesize=2
        )
    ]


def segment_codecs():
    """(delta filter or None, Blosc) for the current codec constants of ``ecgplat.store.schema``;
    built once per process and configuration (the ingest workers build them at start-up)."""
    return _build_codecs(S.SEGMENT_DELTA, S.SEGMENT_CNAME, S.SEGMENT_CLEVEL, S.SEGMENT_SHUFFLE)


@functools.lru_cache(maxsize=4)
def _build_codecs(delta: bool, cname: str, clevel: int, shuffle: str):
    import numcodecs
    from numcodecs import Blosc, Delta

    numcodecs.blosc.use_threads = False  # one Dask thread per worker process: no oversubscription
    shuffle_id = {
        "noshuffle": Blosc.NOSHUFFLE,
        "shuffle": Blosc.SHUFFLE,
        "bitshuffle": Blosc.BITSHUFFLE,
    }[shuffle]
    return (
        Delta(dtype="<i2") if delta else None,
        Blosc(cname=cname, clevel=clevel, shuffle=shuffle_id),
    )


def encode_segments(segments: np.ndarray) -> list[bytes]:
    """int16 (N, 12, 2500) -> N encoded zarr chunks of the ``segments`` array (one segment per
    chunk: delta filter, little-endian bytes, Blosc). Runs on the workers, so that the driver
    only places bytes into shard files. Deterministic: the same segment gives the same bytes."""
    delta, blosc = segment_codecs()
    out = []
    for seg in np.asarray(segments):
        x = np.ascontiguousarray(seg, dtype="<i2")
        if delta is not None:
            x = delta.encode(x)
        out.append(bytes(blosc.encode(x)))
    return out


def decode_segments(chunks: list[bytes]) -> np.ndarray:
    """Inverse of ``encode_segments``: int16 (N, 12, 2500)."""
    delta, blosc = segment_codecs()
    out = np.empty((len(chunks), *_SEG_SHAPE), dtype=np.int16)
    for i, c in enumerate(chunks):
        x = np.frombuffer(blosc.decode(c), dtype="<i2")
        out[i] = (delta.decode(x) if delta is not None else x).reshape(_SEG_SHAPE)
    return out


def direct_layout(arr) -> bool:
    """True if ``segments`` has this version's chunking and codecs (then shard files are written
    from worker-encoded chunks); an older store's array is written through zarr instead."""
    filters, compressors = codecs()
    return (
        tuple(arr.chunks) == (1, *_SEG_SHAPE)
        and S.SEGMENT_CHUNK == 1
        and tuple(arr.shards or ()) == (S.SEGMENT_SHARD, *_SEG_SHAPE)
        and [c.to_dict() for c in arr.filters] == [c.to_dict() for c in filters]
        and [c.to_dict() for c in arr.compressors] == [c.to_dict() for c in compressors]
    )


_EMPTY = np.uint64(2**64 - 1)  # zarr sharding index: an absent chunk


class ShardFiles:
    """Writes the ``segments`` array's shard files directly from encoded chunks (zarr v3
    sharding format: chunk bytes, then the (chunks, 2) uint64 offset/length index and its
    crc32c at the end). Whole shards are written as soon as they are full; the open (last,
    partial) shard is held in memory and written by ``flush()``, i.e. at commit. Every file goes
    through ``ecgplat.atomic`` (temporary file, rename): never half-written.

    Durability is batched per commit. A NEW shard file holds only chunks past the commit point,
    so it need not be durable when it is renamed into place, only before ``commit.json`` counts
    its chunks: it is written without an fsync and ``sync()`` makes all of them durable at
    once (one ``syncfs`` on Linux, else an fsync per file and folder) before the writer
    replaces ``commit.json``. A crash before that leaves whole or missing files past the commit
    point, which the writer's recovery deletes. A file that already EXISTS (the open shard of
    the last commit, rewritten) may hold committed chunks, so it is still fsynced before its
    rename: a power loss must never leave a committed chunk's file without its data."""

    def __init__(self, path: Path, n_segments: int):
        self.dir = path / "segments"
        self.per = S.SEGMENT_SHARD
        self.start = n_segments - n_segments % self.per
        self.unsynced: list[Path] = []  # new shard files not yet made durable
        self.tail: list[bytes | None] = self._read(self.start // self.per)[
            : n_segments - self.start
        ]

    def _file(self, k: int) -> Path:
        return self.dir / "c" / str(k) / "0" / "0"

    def _read(self, k: int) -> list[bytes | None]:
        """The chunks of shard ``k`` as stored (None = absent chunk); [] if there is no file."""
        try:
            data = self._file(k).read_bytes()
        except FileNotFoundError:
            return []
        n_index = self.per * 16
        index = np.frombuffer(data, "<u8", self.per * 2, len(data) - n_index - 4).reshape(-1, 2)
        return [None if off == _EMPTY else data[int(off) : int(off) + int(n)] for off, n in index]

    def _write(self, k: int, chunks: list[bytes | None]) -> None:
        import google_crc32c

        index = np.full((self.per, 2), _EMPTY, dtype="<u8")
        offset = 0
        for i, c in enumerate(chunks):
            if c is not None:
                index[i] = (offset, len(c))
                offset += len(c)
        index_bytes = index.tobytes()
        crc = np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()
        target = self._file(k)
        data = b"".join([*(c for c in chunks if c is not None), index_bytes, crc])
        if target.exists():  # it holds chunks the last commit may refer to: durable at once
            atomic.write_bytes(target, data)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic.replace_unsynced(target, data)  # only chunks past the commit point
        self.unsynced.append(target)

    def extend(self, chunks: list[bytes]) -> None:
        self.tail.extend(chunks)
        while len(self.tail) >= self.per:
            self._write(self.start // self.per, self.tail[: self.per])
            del self.tail[: self.per]
            self.start += self.per

    def flush(self) -> None:
        """Write the open shard (new files stay unsynced until ``sync``)."""
        if self.tail:
            self._write(self.start // self.per, self.tail)

    def clear(self, k: int, positions) -> bool:
        """Rewrite shard file ``k`` without the chunks at ``positions`` (absent chunks read as
        the fill value 0; the other chunks keep their bytes); False when none of them was
        stored (nothing written). Used by ``ecgplat.store.forget``."""
        chunks = self._read(k)
        positions = [p for p in positions if p < len(chunks) and chunks[p] is not None]
        if not positions:
            return False
        for p in positions:
            chunks[p] = None
        self._write(k, chunks)
        return True

    def sync(self) -> None:
        """Make every new shard file durable (see the class docstring): the writer's commit
        calls it after its last write and before it replaces ``commit.json``."""
        atomic.sync_files(self.dir, self.unsynced)
        self.unsynced = []

    def drop_beyond(self, n_segments: int) -> None:
        """Delete shard files wholly past ``n_segments`` (left by a killed run)."""
        first_free = -(-n_segments // self.per)
        for child in (self.dir / "c").iterdir() if (self.dir / "c").is_dir() else ():
            if child.name.isdigit() and int(child.name) >= first_free:
                shutil.rmtree(child, ignore_errors=True)
