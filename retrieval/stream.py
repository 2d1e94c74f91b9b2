"""Append path for streaming ingestion: embed only the records a feature set lacks and add only
the vectors an index lacks, with the model loaded once for the life of the process.

`embed_missing(store, name, embedder)` and `index_missing(index, store, name)` are the two calls
`ecgplat watch` makes after each commit. Embeddings are computed exactly as `embed_store` does
(same encoder, normalisation, lead zero-filling, precision and record means); the feature set is
republished with the old rows followed by the new ones, under the same lineage checks. The
index is the record-level index of every record (`--split all`), grown in place.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class Embedder:
    """A checkpoint's encoder loaded once, with what `embed_store` records in a lineage."""

    def __init__(self, checkpoint, leads="12", device: str = "auto", precision: str = "auto"):
        from ecgplat.leads import parse_leads
        from retrieval.embed import file_sha256, lead_names
        from training.distributed import pick_device
        from training.models.checkpoint import load_checkpoint, load_encoder
        from training.models.flops import inference_batch_size
        from training.normalize import mode_of
        from training.precision import resolve_precision

        self.checkpoint = Path(checkpoint)
        ckpt = load_checkpoint(checkpoint)
        self.kind, self.config, self.normalize = (
            ckpt["kind"],
            ckpt.get("config") or {},
            mode_of(ckpt),
        )
        del ckpt
        self.device = pick_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.sha = file_sha256(checkpoint)
        self.leads, self.lead_idx = lead_names(leads), parse_leads(leads)
        self.encoder = load_encoder(checkpoint).to(self.device)
        self.batch_size = inference_batch_size(self.encoder.cfg)

    def embed(self, store, records: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(segment embeddings, record index, segment number) of `records` of an open store."""
        from training.batch import store_batches
        from training.models.identifier import embed_batches
        from training.normalize import normalize_store_batches

        batches = store_batches(store, records, self.lead_idx, self.batch_size)
        batches = normalize_store_batches(store, batches, self.normalize, self.lead_idx)
        return embed_batches(self.encoder, batches, self.device, self.precision)

    def lineage(self, name: str, store, n_segments: int, dim: int) -> dict:
        import datetime as dt

        from retrieval.embed import SCHEMA

        return {
            "schema": SCHEMA,
            "name": name,
            "checkpoint_sha256": self.sha,
            "checkpoint_kind": self.kind,
            "checkpoint": str(self.checkpoint.resolve()),
            "config": self.config,
            "leads": self.leads,
            "precision": self.precision,
            "normalize": self.normalize,
            "dim": int(dim),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "store_uuid": store.attrs.get("store_uuid"),
            "n_records": int(store.n_records),
            "n_segments": int(n_segments),
            "complete": True,
        }


def _check_same_model(store_path, name: str, old: dict, embedder: Embedder) -> None:
    from retrieval.embed import FeatureError

    same = (
        old.get("checkpoint_sha256") == embedder.sha
        and old.get("leads") == embedder.leads
        and old.get("precision", "fp32") == embedder.precision
    )
    if not same:
        raise FeatureError(
            f"{store_path}: feature set {name!r} holds embeddings of checkpoint "
            f"{old.get('checkpoint_sha256', '?')[:12]} with leads {old.get('leads')} in "
            f"{old.get('precision', 'fp32')}; watch with the same checkpoint or another --embed"
        )


def embed_missing(store_path: str | os.PathLike, name: str, embedder: Embedder) -> int:
    """Embed the committed records that `features/<name>` lacks and append them (the set is
    created when missing); returns how many records were added. FeatureError when the set
    holds another checkpoint's, lead set's or precision's embeddings."""
    from ecgplat.store import open_store
    from retrieval.embed import _publish, load_features, read_lineage
    from training.models.identifier import record_means

    store_path = Path(store_path)
    store = open_store(store_path)
    old = read_lineage(store_path, name)
    if old is not None:
        _check_same_model(store_path, name, old, embedder)
        seg_old = load_features(store_path, name, "segment")
        rec_old = load_features(store_path, name, "record")
        have = rec_old.record_index
    else:
        seg_old = rec_old = None
        have = np.zeros(0, np.int64)
    missing = np.setdiff1d(np.arange(store.n_records, dtype=np.int64), have)
    if len(missing) == 0:
        return 0
    emb, rec, seg = embedder.embed(store, missing)
    rec_ids, rec_emb = record_means(emb, rec)
    seg_cols = {"embedding": emb, "record_index": rec, "segment_number": seg.astype(np.int32)}
    rec_cols = {"embedding": rec_emb, "record_index": rec_ids}
    if seg_old is not None:
        old_seg = (seg_old.embeddings, seg_old.record_index, seg_old.segment_number)
        seg_cols = {
            k: np.concatenate([o, seg_cols[k]]) for k, o in zip(seg_cols, old_seg, strict=True)
        }
        old_rec = (rec_old.embeddings, rec_old.record_index)
        rec_cols = {
            k: np.concatenate([o, rec_cols[k]]) for k, o in zip(rec_cols, old_rec, strict=True)
        }
    lineage = embedder.lineage(name, store, len(seg_cols["embedding"]), emb.shape[1])
    _publish(store_path, name, lineage, seg_cols, rec_cols)
    return len(rec_ids)


def index_missing(index_path: str | os.PathLike, store_path: str | os.PathLike, name: str) -> int:
    """Add to the record-level index of every record (`index build --split all`) the records
    of `features/<name>` it lacks; the index is built when its file is missing. Returns the
    vectors added. LineageError when the index holds another model's vectors, ValueError when
    it is not a record-level index over all records."""
    from ecgplat.store import open_store
    from retrieval.embed import load_features
    from retrieval.index import GalleryIndex, _unit_float32, check_lineage, index_file

    if not index_file(index_path).is_file():
        from retrieval.index import index_from_features

        built = index_from_features(store_path, name, split="all")
        built.save(index_path)
        return len(built)
    gallery = GalleryIndex.load(index_path)
    where = index_file(index_path)
    if gallery.lineage.get("level") != "record" or gallery.lineage.get("split") != "all":
        raise ValueError(f"{where}: watch grows record-level indexes of all records (--split all)")
    feats = load_features(store_path, name, "record")
    check_lineage(gallery.lineage, feats.lineage)
    frame = open_store(store_path).records
    keys = frame["record_key"].to_numpy()[feats.record_index]
    new = ~np.isin(keys, np.asarray(gallery.ids, dtype=object))
    if not new.any():
        return 0
    gallery.index.add(_unit_float32(feats.embeddings[new]))
    gallery.ids += [str(k) for k in keys[new]]
    if gallery.labels is not None:
        patients = frame["patient_key"].to_numpy()[feats.record_index[new]]
        gallery.labels += [str(p) for p in patients]
    gallery.save(index_path)
    return int(new.sum())
