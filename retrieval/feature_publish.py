"""Publishing a feature set into a published store: ``publish_feature_set(url, folder, name)``
uploads the complete set ``folder/name``, embedded from the store at ``url`` (``ecgplat embed
--store URL --features-out FOLDER --publish``), to ``URL/features/<name>/``, where the readers
of the URL find it as one of the store's own sets (``--features NAME``).

The same protocol as ``ecgplat publish`` (``ecgplat.store.publish``), for one set: under the
URL's lock object, from hard links of one committed version of the set's files, the data
files first (only those changed since the set was last published there, by the set's own
manifest ``features/<name>/_published.json``) and the set's lineage (``zarr.json``, its commit
point) last. Another set under that name (another checkpoint, lead set, precision...) is first
uploaded whole under ``features/.build-<name>/``, which readers take while ``features/<name>``
has no lineage.

Refused, with the reason: a URL that holds no published store, a set embedded from another
store, and a set holding rows of records the published store has forgotten since it was
embedded (``embed --overwrite`` embeds it again without them). The set lives in the bucket until
the store itself is published again from its local copy, which replaces the URL's content by
the local store's (its own sets only): publish the set again after that.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ecgplat.locks import ObjectLock
from ecgplat.store import read_forgotten
from ecgplat.store.publish import (
    ATTEMPTS,
    BUILD_PREFIX,
    MANIFEST,
    PublishError,
    Remote,
    file_hashes,
    is_replacement,
    lineage_of,
    link_file,
    link_folder,
    publishable_files,
    set_point,
)
from ecgplat.store.schema import COMMIT_FILE, FEATURES_DIR, is_url
from retrieval.features import LEVELS, FeatureError, FeatureSet

SET_MANIFEST_FORMAT = "ecgplat-published-set/1"


def publish_feature_set(url: str, folder: str | os.PathLike, name: str) -> dict:
    """Upload the complete feature set ``folder/name`` into the store published at ``url``
    (module docstring). Returns what was done; PublishError naming the set or URL and the
    reason."""
    if not is_url(url):
        raise PublishError(f"{url}: not a URL (s3://bucket/prefix, ...)")
    remote = Remote(url)
    fs = FeatureSet(remote.url, name, folder)
    try:
        found = fs.published()  # FeatureError for a set embedded from another store
    except FeatureError as e:
        raise PublishError(str(e)) from None
    if found is None:
        raise PublishError(f"{fs.path}: no complete feature set to publish")
    if remote.get(MANIFEST) is None or remote.get(COMMIT_FILE) is None:
        raise PublishError(f"{remote.url}: no published store there (run ecgplat publish first)")
    busy = f"{remote.url}: being published by another process"
    try:
        with ObjectLock(remote.url, busy):
            tmp, data, point, lineage = _snapshot(found[0])
            try:
                _check_forgotten(remote.url, tmp / "data", lineage, fs.path)
                return _upload(remote, name, data, point, lineage, fs.path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        where = e.filename if e.filename is not None else remote.url
        raise PublishError(f"{where}: {e.strerror or e}") from None


def _snapshot(folder: Path) -> tuple[Path, dict[str, Path], bytes, dict]:
    """A temporary folder (removed by the caller) holding in ``data/`` hard links (or copies) of
    one committed version of the set's data files; those links by name; the bytes and lineage
    of the set's commit point."""
    for _ in range(ATTEMPTS):
        before = (folder / "zarr.json").read_bytes()
        tmp = link_folder(folder)
        data: dict[str, Path] = {}
        for rel, path in publishable_files(folder):
            if rel != "zarr.json" and link_file(path, tmp / "data" / rel):
                data[rel] = tmp / "data" / rel
        lineage = lineage_of(before)
        if data and lineage and (folder / "zarr.json").read_bytes() == before:
            return tmp, data, before, lineage
        shutil.rmtree(tmp, ignore_errors=True)
    raise PublishError(f"{folder}: the feature set kept changing while it was read; try again")


def _check_forgotten(url: str, root: Path, lineage: dict, where: Path) -> None:
    """PublishError when the set holds an embedding of a record the published store has
    forgotten (``ecgplat forget`` zeroes them in the store's own sets; this set lies outside)."""
    import zarr

    forgotten = np.asarray(read_forgotten(url)["records"], dtype=np.int64)
    if not len(forgotten):
        return
    held = 0
    for level in LEVELS:
        n = int(lineage.get("n_segments" if level == "segment" else "n_record_rows") or 0)
        if not (root / level / "record_index" / "zarr.json").is_file() or n == 0:
            continue
        index = np.asarray(zarr.open_array(str(root / level / "record_index"), mode="r")[:n])
        rows = np.flatnonzero(np.isin(index, forgotten))
        if len(rows):
            emb = zarr.open_array(str(root / level / "embedding"), mode="r")
            held = max(held, len(np.unique(index[rows][np.abs(emb[rows]).sum(axis=1) > 0])))
    if held:
        raise PublishError(
            f"{where}: holds embeddings of {held} records the published store has forgotten; "
            "embed again with --overwrite, then publish"
        )


def _set_manifest(remote: Remote, prefix: str) -> dict:
    raw = remote.get(prefix + MANIFEST)
    try:
        manifest = json.loads(raw) if raw is not None else {}
    except ValueError:
        manifest = {}
    ok = manifest.get("format") == SET_MANIFEST_FORMAT and isinstance(manifest.get("files"), dict)
    return manifest if ok else {"format": SET_MANIFEST_FORMAT, "files": {}}


def _upload(
    remote: Remote, name: str, data: dict[str, Path], point: bytes, lineage: dict, where: Path
) -> dict:
    prefix = f"{FEATURES_DIR}/{name}/"
    old_point = remote.get(set_point(name))
    old = lineage_of(old_point)
    replaced = is_replacement(old, lineage)
    manifest = _set_manifest(remote, prefix) if old is not None and not replaced else None
    hashes = file_hashes(data, manifest["files"] if manifest else {})
    changed = {
        rel: path
        for rel, path in data.items()
        if manifest is None or manifest["files"].get(rel) != hashes[rel]
    }
    build = f"{FEATURES_DIR}/{BUILD_PREFIX}{name}/"
    if replaced:  # readers take the complete build while features/<name> has no lineage
        remote.put({build + rel: path for rel, path in data.items()})
        remote.pipe({build + "zarr.json": point})
        remote.delete([set_point(name)])
    remote.put({prefix + rel: path for rel, path in changed.items()})
    own = {"format": SET_MANIFEST_FORMAT, "files": hashes}
    remote.pipe({prefix + MANIFEST: json.dumps(own, sort_keys=True).encode()})
    uploaded_point = replaced or old_point != point
    if uploaded_point:
        remote.pipe({set_point(name): point})
    keep = {prefix + rel for rel in data} | {prefix + MANIFEST, set_point(name)}
    stale = {n for n in remote.names() if n.startswith((prefix, build)) and n not in keep}
    remote.delete(stale)
    return {
        "feature_set": str(where),
        "url": f"{remote.url}/{FEATURES_DIR}/{name}",
        "replaced": replaced,
        "n_records": lineage.get("n_records"),
        "files": len(data) + 1,
        "uploaded": len(changed) + int(uploaded_point),
        "uploaded_bytes": sum(p.stat().st_size for p in changed.values()),
        "deleted": len(stale),
    }
