"""Crash-safe file replacement: the one way ecgplat writes a file that readers may open.

A file is written under a hidden temporary name in its destination folder, flushed and fsynced,
moved over the target with ``os.replace`` (atomic on POSIX within one file system) and the
folder is fsynced so the rename itself survives a power loss. A reader therefore sees the old
file or the new one, never a half-written one; a killed writer leaves at most a
``.NAME.<hex>.tmp`` file, which ``remove_temps`` deletes.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"


def temp_name(path: str | os.PathLike) -> Path:
    """A fresh hidden temporary path next to ``path``: ``.NAME.<hex>.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder, making renames and creations inside it durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def commit_temp(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """fsync the finished temporary file ``tmp``, move it over ``path`` and fsync the folder."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


@contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a writer that takes a file name
    (``torch.save``, ``faiss.write_index``, ``np.savez``, ``fig.savefig``); on a clean exit it
    replaces ``path`` durably, on an exception it is removed and ``path`` is left untouched.
    ``mode`` sets the file's permission bits before it becomes visible."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        commit_temp(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """Replace ``path`` by ``data`` atomically and durably; returns ``path``."""
    with atomic_path(path, mode) as tmp:
        if mode is None:
            tmp.write_bytes(data)
        else:  # never readable by others, not even for a moment
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    return Path(path)


def replace_unsynced(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` by ``data`` atomically (temporary file + rename) but not yet durably:
    for a NEW file whose durability a later ``sync_files`` call guarantees before anything
    refers to it. Never use it to replace a file that readers may already depend on: until
    the sync, a power loss could leave the rename without its data."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _syncfs(folder: str | os.PathLike) -> bool:
    """One ``syncfs(2)`` of the file system holding ``folder``: every file's data and every
    rename on it durable in one call. False where the C library has no syncfs (not Linux)."""
    import ctypes

    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(folder, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}", str(folder))
    finally:
        os.close(fd)
    return True


def sync_files(root: str | os.PathLike, paths: list[Path]) -> None:
    """Make the files ``paths`` (written by ``replace_unsynced`` somewhere below the folder
    ``root``), their renames and the folders created for them durable: one ``syncfs`` of the
    file system (Linux), else an fsync of each file and of each folder from its parent up to
    ``root``."""
    if not paths or _syncfs(root):
        return
    root = Path(root)
    folders = set()
    for path in paths:
        fsync_file(path)
        folder = Path(path).parent
        while folder != root and root in folder.parents:
            folders.add(folder)
            folder = folder.parent
        folders.add(root)
    for folder in sorted(folders, key=lambda f: -len(f.parts)):
        fsync_dir(folder)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` by the UTF-8 ``text`` atomically and durably."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, **dumps_kwargs) -> Path:
    """Replace ``path`` by ``json.dumps(obj, **dumps_kwargs)`` atomically and durably."""
    return write_text(path, json.dumps(obj, **dumps_kwargs))


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make ``dst`` hold the bytes of ``src`` atomically: a hard link when the file system
    allows one, else a copy."""
    import shutil

    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    return Path(dst)


def is_temp(path: Path) -> bool:
    """True for a temporary file of this module (``.NAME.<hex>.tmp``)."""
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX) and path.is_file()


def remove_temps(folder: str | os.PathLike, name: str = "*") -> int:
    """Delete the temporary files a killed writer left in ``folder`` (for targets matching the
    glob ``name``); returns how many. Call it only while no other writer can be active there."""
    folder = Path(folder)
    n = 0
    for tmp in folder.glob(f".{name}.*{TMP_SUFFIX}"):
        if is_temp(tmp):
            tmp.unlink(missing_ok=True)
            n += 1
    return n
