"""Publishing a store to object storage: ``publish(store, url)`` uploads a committed snapshot of
a local store (its data, commit point and complete feature sets; never ``secret.key``), so that
``open_store(url)`` and the commands that read stores by URL read it as it was at that commit.

The snapshot is taken without the writer lock, from hard links (or copies) of the store's files:
every file of a store is replaced by a rename, never rewritten in place, so a link is one whole
version of a file. The commit point (``commit.json``, ``forgotten.json``, each feature set's
``zarr.json``) is read first and read again after the files are linked; a writer that committed
in between makes the snapshot start again. The files linked after a commit hold at least what it
counts (appends go past it; the rows and chunks below it keep their values).

Upload order, so that a reader of the URL sees the old snapshot or the new one: the tombstone
table first (it only masks records), a replaced feature set under its build name, the data
files, the manifest ``_published.json`` (size and SHA-256 of every data file uploaded, so a
republish uploads only what changed), ``commit.json``, the feature sets' lineages, and last the
deletion of objects the new snapshot no longer holds. docs/formats.md ("Published stores")
says exactly what is atomic for a reader and what is not.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ecgplat.file_hash import file_sha256
from ecgplat.locks import ObjectLock
from ecgplat.store.read import open_store, read_commit
from ecgplat.store.schema import (
    COMMIT_FILE,
    FEATURES_DIR,
    FORGOTTEN_FILE,
    SECRET_FILE,
    is_url,
)

MANIFEST = "_published.json"
MANIFEST_FORMAT = "ecgplat-published/1"
BUILD_PREFIX = ".build-"  # a feature set's build folder (retrieval/features.py)
ATTEMPTS = 20  # snapshots tried before giving up on a store that commits faster than we link
# lineage fields that stay the same while a feature set grows; another value = a replaced set
_SET_IDENTITY = ("created", "checkpoint_sha256", "leads", "precision", "normalize", "dim")


class PublishError(ValueError):
    """A store that cannot be published to a URL; the message names the path and the reason."""


@dataclass
class Snapshot:
    """Hard links of one committed version of a store's files in ``folder``: ``data`` maps the
    name of each data file (relative, as on the remote) to its link; ``points`` holds the bytes
    of the commit-point files (``commit.json``, ``forgotten.json``, each set's ``zarr.json``)."""

    folder: Path
    data: dict[str, Path] = field(default_factory=dict)
    points: dict[str, bytes] = field(default_factory=dict)
    sets: dict[str, dict] = field(default_factory=dict)  # feature set name -> lineage

    @property
    def commit(self) -> dict:
        return json.loads(self.points[COMMIT_FILE])


def lineage_of(raw: bytes | None) -> dict | None:
    try:
        lineage = json.loads(raw).get("attributes", {}).get("lineage") if raw else None
    except (ValueError, AttributeError):
        return None
    return lineage if isinstance(lineage, dict) else None


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _feature_folders(store: Path) -> dict[str, Path]:
    """name -> folder of each complete feature set: ``features/<name>``, else its complete
    build folder (an overwrite caught between its two renames reads from there)."""
    root = store / FEATURES_DIR
    names = {p.name.removeprefix(BUILD_PREFIX) for p in root.iterdir()} if root.is_dir() else set()
    found = {}
    for name in sorted(n for n in names if n and not n.startswith(".")):
        for folder in (root / name, root / f"{BUILD_PREFIX}{name}"):
            lineage = lineage_of(_read(folder / "zarr.json"))
            if lineage and lineage.get("complete"):
                found[name] = folder
                break
    return found


def set_point(name: str) -> str:
    """The name of a feature set's commit point (its lineage) in a snapshot."""
    return f"{FEATURES_DIR}/{name}/zarr.json"


def _points(store: Path, sets: dict[str, Path]) -> dict[str, bytes | None]:
    out = {COMMIT_FILE: _read(store / COMMIT_FILE), FORGOTTEN_FILE: _read(store / FORGOTTEN_FILE)}
    for name, folder in sets.items():
        out[set_point(name)] = _read(folder / "zarr.json")
    return out


Skip = tuple[tuple[Path, str], ...]  # (parent, name) of folders left out


def publishable_files(folder: Path, skip_dirs: Skip = ()) -> Iterator[tuple[str, Path]]:
    """(relative name, path) of the files below ``folder`` a reader may need: not hidden ones
    (the lock, temporary files, build folders), not zarr's ``*.partial`` files."""
    for parent, dirs, names in os.walk(folder):
        here = Path(parent)
        dirs[:] = [d for d in dirs if not d.startswith(".") and (here, d) not in skip_dirs]
        for name in names:
            if not name.startswith(".") and not name.endswith(".partial"):
                path = here / name
                yield path.relative_to(folder).as_posix(), path


def link_folder(beside: Path) -> Path:
    """A new temporary folder for a snapshot's links: next to ``beside`` (the same filesystem,
    so links work) where that is writable, else in the system's temporary folder."""
    parent = beside.parent if os.access(beside.parent, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=f".{beside.name}.publish-", dir=parent))


def link_file(path: Path, link: Path) -> bool:
    """Hard-link ``path`` at ``link`` (a copy where links fail): one whole version of a file
    that is only ever replaced by a rename. False when it is gone (replaced or dropped meanwhile:
    the commit points tell)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(path, link)
    except FileNotFoundError:
        return False
    except OSError:
        shutil.copy2(path, link)
    return True


@contextmanager
def snapshot(store: Path) -> Iterator[Snapshot]:
    """A consistent snapshot of the committed store at ``store`` (module docstring), removed
    on exit. PublishError when the store keeps committing while it is linked."""
    for _ in range(ATTEMPTS):
        folder = link_folder(store)
        try:
            sets = _feature_folders(store)
            before = _points(store, sets)
            snap = Snapshot(folder)
            parts: list[tuple[str, Path, Skip]] = [("", store, ((store, FEATURES_DIR),))]
            parts += [(f"{FEATURES_DIR}/{n}/", f, ()) for n, f in sets.items()]
            top = store / FEATURES_DIR
            parts += [(f"{FEATURES_DIR}/", top, tuple((top, d.name) for d in _dirs(top)))]
            for prefix, root, skip_dirs in parts:
                for rel, path in publishable_files(root, skip_dirs):
                    name = prefix + rel
                    if name in before or name == SECRET_FILE:
                        continue
                    link = folder / "data" / name
                    if link_file(path, link):
                        snap.data[name] = link
            if _points(store, _feature_folders(store)) == before:
                snap.points = {k: v for k, v in before.items() if v is not None}
                snap.sets = {n: lineage_of(before[set_point(n)]) or {} for n in sets}
                yield snap
                return
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    raise PublishError(f"{store}: the store kept committing while it was read; publish again")


def _dirs(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []


class Remote:
    """The published copy at ``url``: reads, uploads and deletes of its objects by name."""

    def __init__(self, url: str):
        import fsspec

        if not url.split("://", 1)[-1].strip("/"):
            raise PublishError(f"{url}: the URL names no bucket or folder")
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ValueError, ImportError) as e:
            raise PublishError(f"{self.url}: not a URL this machine can write to ({e})") from None
        self.root = self.root.rstrip("/")
        if not self.root or self.root == self.fs.root_marker:
            raise PublishError(f"{self.url}: the URL names no bucket or folder")

    def key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def get(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.key(name))
        except FileNotFoundError:
            return None

    def names(self) -> set[str]:
        """Every object name under the URL (relative)."""
        self.fs.invalidate_cache()
        try:
            keys = self.fs.find(self.root)
        except FileNotFoundError:
            return set()
        return {k[len(self.root) + 1 :] for k in keys if k.startswith(self.root + "/")}

    def put(self, files: dict[str, Path]) -> None:
        if files:
            names = sorted(files)
            self.fs.put([str(files[n]) for n in names], [self.key(n) for n in names])

    def pipe(self, objects: dict[str, bytes]) -> None:
        if objects:
            self.fs.pipe({self.key(n): data for n, data in objects.items()})

    def delete(self, names) -> None:
        if names:
            self.fs.rm([self.key(n) for n in sorted(names)])


def _manifest(remote: Remote, uuid: str, url: str) -> dict:
    """The manifest of the copy at ``url`` (an empty one for an empty prefix); PublishError for
    a prefix that holds something else, or another store."""
    raw = remote.get(MANIFEST)
    if raw is None:
        if remote.names() - {".lock"}:
            raise PublishError(f"{url}: not empty and not a published ecgplat store")
        return {"format": MANIFEST_FORMAT, "store_uuid": uuid, "files": {}}
    try:
        manifest = json.loads(raw)
        ok = manifest.get("format") == MANIFEST_FORMAT and isinstance(manifest.get("files"), dict)
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise PublishError(f"{url}/{MANIFEST}: corrupt publish manifest")
    if manifest.get("store_uuid") != uuid:
        raise PublishError(
            f"{url}: holds another store (store_uuid {manifest.get('store_uuid')}, not {uuid})"
        )
    return manifest


def file_hashes(data: dict[str, Path], old: dict) -> dict[str, list]:
    """[size, sha256, mtime_ns] of every data file (name -> path); a file whose size and mtime
    equal the manifest's ``old`` keeps its hash (files are replaced, never modified in place)."""
    out: dict[str, list] = {}
    for name, path in data.items():
        st = path.stat()
        prev = old.get(name)
        if isinstance(prev, list) and prev[::2] == [st.st_size, st.st_mtime_ns]:
            out[name] = prev
        else:
            out[name] = [st.st_size, file_sha256(path), st.st_mtime_ns]
    return out


def is_replacement(old: dict | None, new: dict) -> bool:
    """Whether the feature set of lineage ``new`` is another set than the remote one of lineage
    ``old`` (not a grown state of it): its chunks would change under readers of the old one."""
    if old is None:
        return False
    grown = all(
        int(old.get(k) or 0) <= int(new.get(k) or 0)
        for k in ("n_segments", "n_record_rows", "n_records")
    )
    return not grown or any(old.get(k) != new.get(k) for k in _SET_IDENTITY)


def _replaced_sets(remote: Remote, snap: Snapshot) -> list[str]:
    """Feature sets whose remote copy is another set under the same name."""
    return [
        name
        for name, lineage in snap.sets.items()
        if is_replacement(lineage_of(remote.get(set_point(name))), lineage)
    ]


def _check_not_older(remote: Remote, commit: dict, url: str) -> None:
    raw = remote.get(COMMIT_FILE)
    if raw is None:
        return
    try:
        old = json.loads(raw)
        counts = {k: int(old[k]) for k in ("n_records", "n_segments", "n_rejects")}
    except (ValueError, KeyError, TypeError):
        raise PublishError(f"{url}/{COMMIT_FILE}: corrupt commit point") from None
    if any(n > int(commit[k]) for k, n in counts.items()):
        raise PublishError(
            f"{url}: holds a newer commit ({counts['n_records']} records) than the store "
            f"({commit['n_records']} records); publish to another prefix"
        )


def check_store(store: str | os.PathLike) -> Path:
    """The local store to publish; PublishError (FileNotFoundError for a missing path) naming
    it and the reason."""
    if is_url(store):
        raise PublishError(f"{store}: publish reads a local store, not a URL")
    path = Path(store)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such store folder")
    view = open_store(path)  # FileNotFoundError / ValueError naming the path
    if not (path / COMMIT_FILE).is_file():
        raise PublishError(f"{path}: nothing committed yet (no {COMMIT_FILE}); nothing to publish")
    read_commit(path)
    del view
    return path


def publish(store: str | os.PathLike, url: str) -> dict:
    """Upload a committed snapshot of the local ``store`` to ``url`` (module docstring), only
    the files that changed since the last publish there. Returns what was done."""
    path = check_store(store)
    if not is_url(url):
        raise PublishError(f"{url}: not a URL (s3://bucket/prefix, ...)")
    remote = Remote(url)
    uuid = str(open_store(path).attrs.get("store_uuid"))
    busy = f"{remote.url}: being published by another process"
    try:
        with ObjectLock(remote.url, busy), snapshot(path) as snap:
            return _upload(remote, snap, uuid, path)
    except OSError as e:  # a local file names itself; the object store's errors name nothing
        where = e.filename if e.filename is not None else remote.url
        raise PublishError(f"{where}: {e.strerror or e}") from None


def _upload(remote: Remote, snap: Snapshot, uuid: str, path: Path) -> dict:
    url = remote.url
    manifest = _manifest(remote, uuid, url)
    _check_not_older(remote, snap.commit, url)
    if not manifest["files"] and remote.get(MANIFEST) is None:
        remote.pipe({MANIFEST: json.dumps(manifest).encode()})  # claims the prefix first
    hashes = file_hashes(snap.data, manifest["files"])
    changed = {n: snap.data[n] for n, h in hashes.items() if manifest["files"].get(n) != h}
    points = {n: b for n, b in snap.points.items() if remote.get(n) != b}
    n_points = len(points)
    if FORGOTTEN_FILE in points:  # masks records before their data change
        remote.pipe({FORGOTTEN_FILE: points.pop(FORGOTTEN_FILE)})
    replaced = _replaced_sets(remote, snap)
    for name in replaced:  # readers take a complete build while features/<name> is missing
        prefix, build = f"{FEATURES_DIR}/{name}/", f"{FEATURES_DIR}/{BUILD_PREFIX}{name}/"
        remote.put(
            {build + n[len(prefix) :]: p for n, p in snap.data.items() if n.startswith(prefix)}
        )
        remote.pipe({build + "zarr.json": snap.points[set_point(name)]})
        remote.delete([set_point(name)])
        changed.update({n: p for n, p in snap.data.items() if n.startswith(prefix)})
    remote.put(changed)
    published = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    new = {"format": MANIFEST_FORMAT, "store_uuid": uuid, "published": published}
    remote.pipe({MANIFEST: json.dumps({**new, "files": hashes}, sort_keys=True).encode()})
    if COMMIT_FILE in points:
        remote.pipe({COMMIT_FILE: points.pop(COMMIT_FILE)})
    remote.pipe(points)  # the feature sets' lineages: each its set's commit point
    keep = set(snap.data) | set(snap.points) | {MANIFEST, ".lock"}
    stale = remote.names() - keep
    remote.delete(stale)
    commit = snap.commit
    return {
        "store": str(path),
        "url": url,
        "n_records": commit["n_records"],
        "n_segments": commit["n_segments"],
        "feature_sets": sorted(snap.sets),
        "files": len(hashes) + len(snap.points),
        "uploaded": len(changed) + n_points,
        "uploaded_bytes": sum(p.stat().st_size for p in changed.values()),
        "deleted": len(stale),
    }
