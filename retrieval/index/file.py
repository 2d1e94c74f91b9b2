"""The on-disk form of a FAISS gallery index: file names, the framing of one file (FAISS's own
serialisation, then a JSON description, then a trailer) and its reading and writing.

`NAME.faiss` holds the main index; `NAME.faiss.delta-NNNNNN` the exact delta segments that
`ecgplat index update` chains to it; `NAME.faiss.lock` is the writer lock. The trailer (8-byte
description length, 8-byte magic `ECGPIDX2`) lets a reader find the description without
parsing FAISS's bytes; the description's row names come last, so a reader that needs only the
head stops before them. Layout: docs/formats.md, "FAISS index".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import faiss

from ecgplat import atomic
from ecgplat.faults import stop_point
from ecgplat.locks import WriterLock

INDEX_KINDS = ("flat", "hnsw", "ivf")
LOCK_SUFFIX = ".lock"  # NAME.faiss.lock: the index's writer lock
META_FORMAT = "ecgplat-faiss-index/2"
DELTA_FORMAT = "ecgplat-faiss-delta/1"
INDEX_SUFFIX = ".faiss"
DELTA_INFIX = ".delta-"  # NAME.faiss.delta-000001, ...
TRAILER_MAGIC = b"ECGPIDX2"  # last 8 bytes of an index file
_TRAILER = struct.Struct("<Q8s")  # description length in bytes, magic
_WS = re.compile(r"\s*")


def delta_file(path: str | Path, seq: int) -> Path:
    """The file of delta segment `seq` (1, 2, ...) of the index `path`."""
    index_path = index_file(path)
    return index_path.with_name(f"{index_path.name}{DELTA_INFIX}{seq:06d}")


def delta_files(index_path: Path) -> list[Path]:
    """The delta segment files next to `index_path`, in sequence order."""
    prefix = index_path.name + DELTA_INFIX
    found = [
        p
        for p in index_path.parent.glob(f"{index_path.name}{DELTA_INFIX}*")
        if p.name[len(prefix) :].isdigit() and p.is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(prefix) :]))


def seq_of(path: Path) -> int:
    return int(path.name.rsplit(DELTA_INFIX, 1)[1])


def supersedes_entry(index_path: Path) -> dict | None:
    """The ``supersedes`` entry for a write over the main file at `index_path`: its identity
    and the highest delta sequence number there; None when there is no readable main file
    (its deltas are then deleted after the write, not superseded)."""
    try:
        with open(index_path, "rb") as f:
            meta, _ = _read_description(f, index_path, META_FORMAT, head=True)  # its uid only
    except (OSError, ValueError):
        return None
    return {"main": meta["uid"], "seq": max(map(seq_of, delta_files(index_path)), default=0)}


def superseded(main_meta: dict, seq: int, path: Path) -> bool:
    """True for a delta left behind by a kill after the main file replacing it was written."""
    old = main_meta.get("supersedes") or {}
    if not old or seq > int(old.get("seq", 0)):
        return False
    with open(path, "rb") as f:
        meta, _ = _read_description(f, path, DELTA_FORMAT)
    return meta.get("main") == old.get("main")


def stat_key(path: Path) -> tuple | None:
    """What changes when a file is replaced by a rename (a new inode) or rewritten."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def write_framed(path: Path, index: faiss.Index, meta: dict, fault: str) -> None:
    """One file: FAISS serialisation, JSON description, trailer; replaced atomically. The
    description (the same bytes as `json.dumps(meta)`) is written as it is encoded, so a large
    gallery's row names are never held as one more string."""
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = faiss.PyCallbackIOWriter(f.write)
        faiss.write_index(index, writer)
        del writer
        n_description, pending, size = 0, [], 0
        for piece in json.JSONEncoder().iterencode(meta):
            pending.append(piece)
            size += len(piece)
            if size >= 1 << 16:  # pieces are small str objects: flush often
                n_description += f.write("".join(pending).encode())
                pending, size = [], 0
        n_description += f.write("".join(pending).encode())
        f.write(_TRAILER.pack(n_description, TRAILER_MAGIC))
        f.flush()
        stop_point(fault)


def read_framed(
    path: Path, fmt: str, vectors: bool, head: bool = False
) -> tuple[dict, faiss.Index | None]:
    with open(path, "rb") as f:  # one open file: one version, even during a rebuild
        meta, n_index = _read_description(f, path, fmt, head)
        if not vectors:
            return meta, None
        f.seek(0)
        index = _read_faiss(f, n_index, path)
    if index.ntotal != meta["count"] or index.d != meta["dim"]:
        raise ValueError(
            f"{path}: {index.ntotal} vectors of dim {index.d} do not match "
            f"its description ({meta['count']} ids, dim {meta['dim']})"
        )
    return meta, index


def _read_description(
    f, where: Path, fmt: str = META_FORMAT, head: bool = False
) -> tuple[dict, int]:
    """(description, length of the FAISS part) of an open index file; ValueError if it is
    not an ecgplat index file or its description is malformed. ``head=True`` parses a main
    file's description only up to its row names (``ids`` and ``labels`` are then None and
    ``"deferred"`` is True), which a million-row index would spend most of the time on."""
    size = os.fstat(f.fileno()).st_size
    if size < _TRAILER.size:
        raise ValueError(f"{where}: not an ecgplat index file ({size} bytes)")
    f.seek(size - _TRAILER.size)
    n_meta, magic = _TRAILER.unpack(f.read(_TRAILER.size))
    if magic != TRAILER_MAGIC or n_meta > size - _TRAILER.size:
        raise ValueError(
            f"{where}: not an ecgplat index file (no description trailer; "
            "rebuild it with `ecgplat index build`)"
        )
    n_index = size - _TRAILER.size - n_meta
    f.seek(n_index)
    meta = _read_head(f, n_meta) if head else None
    if meta is None:  # the whole description (also: a file written before the row names came last)
        f.seek(n_index)
        raw = f.read(n_meta)
        try:
            meta = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{where}: corrupt index description ({e})") from None
        if isinstance(meta, dict) and fmt == META_FORMAT and not isinstance(meta.get("uid"), str):
            meta["uid"] = hashlib.sha256(raw).hexdigest()[:32]  # written before deltas
    _check_description(meta, where, fmt)
    return meta, n_index


def _read_head(f, n_meta: int) -> dict | None:
    """The keys of the JSON object at `f` that precede ``"ids"`` (read in growing prefixes,
    each key's value parsed whole), or None when it has no ``"uid"`` before ``"ids"``."""
    n, decoder = 1 << 16, json.JSONDecoder()
    start = f.tell()
    while True:
        text = f.read(min(n, n_meta)).decode("utf-8", errors="ignore")
        try:
            out = _head_keys(text, decoder)
        except (json.JSONDecodeError, IndexError):
            out = None  # the prefix ended inside the head, or a corrupt description
        if out is not None or n >= n_meta:
            return out if out is not None and isinstance(out.get("uid"), str) else None
        n *= 4
        f.seek(start)


def _head_keys(text: str, decoder: json.JSONDecoder) -> dict | None:
    i = _WS.match(text, 0).end()
    if text[i] != "{":
        return None
    out, i = {}, i + 1
    while True:
        i = _WS.match(text, i).end()
        if text[i] == "}":
            return None  # no row names: parse it whole
        key, i = decoder.raw_decode(text, i)
        i = _WS.match(text, i).end()
        if text[i] != ":":
            return None
        if key == "ids":
            return {**out, "ids": None, "labels": None, "deferred": True}
        value, i = decoder.raw_decode(text, _WS.match(text, i + 1).end())
        out[key] = value
        i = _WS.match(text, i).end()
        if text[i] == ",":
            i += 1


def _check_description(meta, where: Path, fmt: str = META_FORMAT) -> None:
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: corrupt index description (not a JSON object)")
    if meta.get("format") != fmt:
        raise ValueError(f"{where}: not an ecgplat index (format {meta.get('format')!r})")
    for key in ("count", "dim"):
        if type(meta.get(key)) is not int or meta[key] < 0:
            raise ValueError(f"{where}: corrupt index description ({key}={meta.get(key)!r})")
    if meta.get("kind") not in INDEX_KINDS:
        raise ValueError(f"{where}: corrupt index description (kind={meta.get('kind')!r})")
    for key in ("ids", "labels"):
        rows = meta.get(key)
        if meta.get("deferred"):
            break
        if (rows is not None or key == "ids") and (
            not isinstance(rows, list) or len(rows) != meta["count"]
        ):
            raise ValueError(
                f"{where}: corrupt index description ({key} is not a list of {meta['count']})"
            )


def _read_faiss(f, n_bytes: int, where: Path) -> faiss.Index:
    """The FAISS index in the first ``n_bytes`` of the open file ``f``; ValueError if FAISS
    cannot read it (truncated, random bytes, another format)."""
    left = [n_bytes]

    def read(n: int) -> bytes:
        data = f.read(min(n, left[0]))
        left[0] -= len(data)
        return data

    try:
        return faiss.read_index(faiss.PyCallbackIOReader(read))
    except (RuntimeError, MemoryError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        reason = reason.split(": ", 1)[-1] if " at /" in reason else reason
        raise ValueError(f"{where}: not a readable FAISS index ({reason[:120]})") from None


def index_file(path: str | Path) -> Path:
    """The index file for `X` or `X.faiss`: `X.faiss`."""
    p = Path(path)
    return p if p.suffix == INDEX_SUFFIX else p.with_name(p.name + INDEX_SUFFIX)


def index_lock(path: str | Path) -> WriterLock:
    """The single-writer lock of the index at `path` (`NAME.faiss.lock` next to it), held by every
    writer of its main file or delta segments: two updates never take one sequence number, and a
    writer's clean-up of killed writers' files never meets a live one. StoreBusyError when held."""
    index_path = index_file(path)
    busy = f"{index_path}: index is being written by another process"
    return WriterLock(index_path.with_name(index_path.name + LOCK_SUFFIX), busy)
