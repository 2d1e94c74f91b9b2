"""Embeddings of every stored ECG, written back into the feature store with their lineage.

`embed_store(store, checkpoint, name, leads)` runs the checkpoint's encoder (any kind:
pretrain, diagnosis, identify, imported) over every committed segment of the store and writes
the feature set `STORE/features/<name>/` (segment- and record-level embeddings plus their
lineage; layout in docs/formats.md, "Feature sets").

An embedding is the L2-normalised time-mean of the encoder output (the identification embedding of
docs/method.md §6.1) computed with the leads outside `leads` zero-filled, under the resolved
`precision` (fp32 | bf16, recorded in the lineage). The feature set is built under
`features/.tmp-<name>-<id>` and renamed into place only when complete, so an interrupted run never
leaves a half-written feature set under its name (the leftover temporary group is removed by the
next run); the write holds the store's writer lock. Re-running with the same checkpoint (by
SHA-256), leads and precision on an unchanged store is a no-op; another checkpoint, lead set or
precision under an existing name needs `overwrite=True`. Store reads run one batch ahead in a
thread, overlapping the forward passes; the default batch size is sized to the model
(`training.models.flops.inference_batch_size`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecgplat.atomic import fsync_dir
from ecgplat.store import FEATURES_DIR as FEATURES
from ecgplat.store import StoreLock

SCHEMA = "ecgplat-features/1"
LEVELS = ("segment", "record")


class FeatureError(ValueError):
    """A feature set that cannot be written or read; the message names the store and the reason."""


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def lead_names(leads) -> str:
    """Canonical comma-joined lead names of a lead spec ("12", "I,II,V2", ...)."""
    from ecgplat.leads import LEADS, parse_leads

    return ",".join(LEADS[i] for i in parse_leads(leads))


def feature_dir(store_path: str | os.PathLike, name: str) -> Path:
    if not name or name.startswith(".") or "/" in name or name in LEVELS:
        raise FeatureError(f"{store_path}: bad feature set name {name!r}")
    return Path(store_path) / FEATURES / name


def read_lineage(store_path: str | os.PathLike, name: str) -> dict | None:
    """The lineage of a complete feature set, or None when there is none under that name."""
    import json

    meta = feature_dir(store_path, name) / "zarr.json"
    if not meta.is_file():
        return None
    lineage = json.loads(meta.read_text()).get("attributes", {}).get("lineage")
    return lineage if lineage and lineage.get("complete") else None


def list_features(store_path: str | os.PathLike) -> list[str]:
    root = Path(store_path) / FEATURES
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if not p.name.startswith(".") and read_lineage(store_path, p.name)
    )


@dataclass
class Features:
    embeddings: np.ndarray  # float32 (n, D) unit rows
    record_index: np.ndarray  # int64 (n,)
    segment_number: np.ndarray | None  # int32 (n,) for segment level
    lineage: dict


def load_features(store_path: str | os.PathLike, name: str, level: str = "record") -> Features:
    import zarr

    if level not in LEVELS:
        raise FeatureError(f"unknown feature level {level!r}; choose segment or record")
    lineage = read_lineage(store_path, name)
    if lineage is None:
        have = ", ".join(list_features(store_path)) or "none"
        raise FeatureError(
            f"{store_path}: no feature set {name!r} (have: {have}); run `ecgplat embed` first"
        )
    from ecgplat.store import read_forgotten

    group = zarr.open_group(str(feature_dir(store_path, name) / level), mode="r")
    record_index = np.asarray(group["record_index"][:], dtype=np.int64)
    keep = ~np.isin(record_index, read_forgotten(store_path)["records"])  # `ecgplat forget`
    return Features(
        np.asarray(group["embedding"][:], dtype=np.float32)[keep],
        record_index[keep],
        np.asarray(group["segment_number"][:])[keep] if level == "segment" else None,
        lineage,
    )


def _remove_leftovers(store_path: Path, name: str) -> None:
    for tmp in (store_path / FEATURES).glob(f".tmp-{name}-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _write_group(path: Path, lineage: dict, seg: tuple, rec: tuple) -> None:
    import zarr

    group = zarr.open_group(str(path), mode="w")
    for level, arrays in (("segment", seg), ("record", rec)):
        sub = group.create_group(level)
        for key, value in arrays.items():
            chunks = (min(max(len(value), 1), 65536),) + value.shape[1:]
            sub.create_array(key, shape=value.shape, dtype=value.dtype, chunks=chunks)[...] = value
    group.attrs["lineage"] = lineage  # last: the set is marked complete only once all is written


def _publish(store_path: Path, name: str, lineage: dict, seg: dict, rec: dict) -> None:
    """Write the feature set under a temporary name and rename it into place, holding the
    store's writer lock (like ingest and split; StoreBusyError while another writer runs)."""
    with StoreLock(store_path):
        _publish_locked(store_path, name, lineage, seg, rec)


def _publish_locked(store_path: Path, name: str, lineage: dict, seg: dict, rec: dict) -> None:
    if not (store_path / FEATURES / "zarr.json").is_file():  # `features` as a zarr group
        import zarr

        zarr.open_group(str(store_path / FEATURES), mode="a")
    _remove_leftovers(store_path, name)
    tmp = store_path / FEATURES / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    _write_group(tmp, lineage, seg, rec)
    target = feature_dir(store_path, name)
    if target.exists():  # overwrite: move the old set aside first, then swap in the new one
        trash = store_path / FEATURES / f".tmp-{name}-old-{uuid.uuid4().hex[:8]}"
        os.replace(target, trash)
        os.replace(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_dir(store_path / FEATURES)


def embed_store(
    store_path: str | os.PathLike,
    checkpoint: str | os.PathLike,
    name: str,
    leads="12",
    overwrite: bool = False,
    batch_size: int | None = None,
    device: str = "auto",
    progress: bool = False,
    precision: str = "auto",
) -> dict:
    """Embed every stored segment with `checkpoint`'s encoder into `features/<name>`.

    `precision` auto | fp32 | bf16 (training.precision); `batch_size` None = sized to the model.
    Returns {"status": "written" | "unchanged", "name", "n_segments", "n_records", "lineage"}.
    Raises FeatureError (existing set of another lineage without `overwrite`), CheckpointError
    (unusable checkpoint), FileNotFoundError/ValueError (not a store).
    """
    from ecgplat.leads import parse_leads
    from ecgplat.progress import ProgressBar
    from ecgplat.store import open_store
    from training.batch import store_batches
    from training.distributed import pick_device
    from training.models.checkpoint import CheckpointError, encoder_from, load_checkpoint
    from training.models.flops import inference_batch_size
    from training.models.identifier import embed_batches, record_means
    from training.normalize import mode_of, normalize_store_batches
    from training.precision import resolve_precision

    store_path = Path(store_path)
    dev = pick_device(device)
    precision = resolve_precision(precision, dev)
    store = open_store(store_path)
    feature_dir(store_path, name)  # a bad name fails before the slow part
    # one read of the checkpoint: hashed for the lineage, then loaded from the same bytes
    try:
        data = Path(checkpoint).read_bytes()
    except OSError:
        raise CheckpointError(Path(checkpoint), "no such checkpoint file") from None
    sha = hashlib.sha256(data).hexdigest()
    wanted_leads = lead_names(leads)
    old = read_lineage(store_path, name)
    if old is not None:
        same_model = (
            old.get("checkpoint_sha256") == sha
            and old.get("leads") == wanted_leads
            and old.get("precision", "fp32") == precision
        )
        same_store = (
            old.get("store_uuid") == store.attrs.get("store_uuid")
            and old.get("n_segments") == store.n_segments
        )
        if same_model and same_store and not overwrite:
            return {
                "status": "unchanged",
                "name": name,
                "n_segments": old["n_segments"],
                "n_records": old["n_records"],
                "lineage": old,
            }
        if not same_model and not overwrite:
            raise FeatureError(
                f"{store_path}: feature set {name!r} holds embeddings of checkpoint "
                f"{old.get('checkpoint_sha256', '?')[:12]} with leads "
                f"{old.get('leads')} in {old.get('precision', 'fp32')}; "
                "use another --name or --overwrite"
            )

    ckpt = load_checkpoint(checkpoint, data=data)
    del data
    encoder = encoder_from(ckpt, checkpoint)
    normalize = mode_of(ckpt)  # as the encoder was trained
    encoder.to(dev)
    batch_size = batch_size or inference_batch_size(encoder.cfg)
    records = store.select()  # every record but the forgotten ones
    with ProgressBar(progress, len(records), f"embed {name}", transient=True) as bar:
        batches = store_batches(
            store, records, parse_leads(leads), batch_size, on_record=bar.advance
        )
        batches = normalize_store_batches(store, batches, normalize, parse_leads(leads))
        emb, rec, seg = embed_batches(encoder, batches, dev, precision)
    rec_ids, rec_emb = record_means(emb, rec)
    lineage = {
        "schema": SCHEMA,
        "name": name,
        "checkpoint_sha256": sha,
        "checkpoint_kind": ckpt["kind"],
        "checkpoint": str(Path(checkpoint).resolve()),
        "config": ckpt.get("config") or {},
        "leads": wanted_leads,
        "precision": precision,
        "normalize": normalize,
        "dim": int(emb.shape[1]),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "store_uuid": store.attrs.get("store_uuid"),
        "n_records": int(store.n_records),
        "n_segments": len(emb),
        "complete": True,
    }
    del ckpt

    _publish(
        store_path,
        name,
        lineage,
        {"embedding": emb, "record_index": rec, "segment_number": seg.astype(np.int32)},
        {"embedding": rec_emb, "record_index": rec_ids},
    )
    return {
        "status": "written",
        "name": name,
        "n_segments": len(emb),
        "n_records": len(rec_ids),
        "lineage": lineage,
    }
