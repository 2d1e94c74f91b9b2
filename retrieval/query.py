"""Similar-ECG queries against a saved gallery index, and a plot of a query with its matches.

An index (see `retrieval.index`) records the lineage of its embeddings: the checkpoint (path and
SHA-256), the lead set, the feature set, its level (record or segment) and the store. A query is

* a record of that store (`query_record`): its stored embedding of the same feature set; or
* a new ECG given as conditioned segments (`query_signal`): float32 (S, 12, 2500) mV at 500 Hz in
  canonical lead order plus its lead mask. Reading and conditioning a file is ingestion's job; this
  package may not import `ingestion` (docs/ARCHITECTURE.md), so the caller (the CLI, through
  `ingestion.one_file.read_one`) conditions the file and passes the segments here.
  They are embedded on the fly with the index's checkpoint and leads (the record embedding: mean
  of the segment embeddings, re-normalised), after checking the checkpoint file still has the
  index's SHA-256.

Results are rows {rank, id, score (cosine), same_patient (store queries only)}; patient keys
are never returned or printed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ecgplat.leads import LEADS, parse_leads
from ecgplat.store import open_store
from retrieval.features import FeatureError, open_features
from retrieval.figures import pyplot, save_figure
from retrieval.index import GalleryIndex, LineageError
from retrieval.model import LoadedModel
from training.normalize import normalize_record


def _matches(
    index: GalleryIndex,
    embedding: np.ndarray,
    k: int,
    lineage: dict,
    skip_id: str | None = None,
    label: str | None = None,
) -> list[dict]:
    scores, rows = index.search(embedding.reshape(1, -1), k + (skip_id is not None), lineage)
    out = []
    for score, row in zip(scores[0], rows[0], strict=True):
        if row < 0 or index.ids[row] == skip_id:
            continue
        match = {"rank": len(out) + 1, "id": index.ids[row], "score": float(score)}
        if label is not None and index.labels is not None:
            match["same_patient"] = bool(index.labels[row] == label)
        out.append(match)
    return out[:k]


def query_record(index: GalleryIndex, record_key: str, k: int = 5) -> list[dict]:
    """Nearest gallery items of a record of the index's store (the record itself excluded)."""
    lineage = index.lineage
    store_path, name = lineage.get("store"), lineage.get("features")
    if not store_path or not name:
        raise LineageError("the index does not name the store and feature set it was built from")
    store = open_store(store_path)
    hits = np.flatnonzero((store.column("record_key") == record_key) & store.live)
    if len(hits) == 0:
        raise KeyError(f"{store_path}: no record {record_key!r}")
    level = lineage.get("level", "record")
    feats = open_features(store_path, name, "record")  # one row is read, not the set
    rows = np.flatnonzero(feats.record_index == hits[0])
    if len(rows) == 0:
        raise FeatureError(
            f"{store_path}: record {record_key!r} has no embedding in {name!r} "
            f"(embedded before it was ingested? re-run `ecgplat embed`)"
        )
    skip = record_key if level == "record" else None
    matches = _matches(
        index,
        feats.rows[rows[:1]][0],
        k,
        feats.lineage,
        skip_id=skip,
        label=store.column_at("patient_key", hits[:1])[0],
    )
    if level == "segment":  # drop the record's own segments
        matches = [m for m in matches if not m["id"].startswith(record_key + "#")]
        for i, m in enumerate(matches):
            m["rank"] = i + 1
    return matches


def embed_signal(
    checkpoint: str | os.PathLike | LoadedModel,
    segments_mv: np.ndarray,
    lead_mask: np.ndarray,
    leads: str,
    device: str = "auto",
    precision: str = "auto",
) -> np.ndarray:
    """Record embedding (D,) of conditioned segments with the checkpoint's encoder and `leads`,
    in `precision` (auto | fp32 | bf16); `checkpoint` may be an already loaded model."""
    from training.batch import make_batch
    from training.distributed import pick_device
    from training.models.identifier import embed_batches, record_means

    if np.ndim(segments_mv) != 3 or len(segments_mv) == 0:
        raise ValueError(
            f"expected conditioned segments (S, 12, T) in mV, got shape {np.shape(segments_mv)}"
        )
    model = checkpoint if isinstance(checkpoint, LoadedModel) else LoadedModel.load(checkpoint)
    x = normalize_record(segments_mv, model.normalize)  # as trained
    batch = make_batch(x, lead_mask, 0, parse_leads(leads))
    dev = pick_device(device)
    emb, rec, _ = embed_batches(model.encoder.to(dev), [batch], dev, precision)
    return record_means(emb, rec)[1][0]


def query_signal(
    index: GalleryIndex,
    segments_mv: np.ndarray,
    lead_mask: np.ndarray,
    k: int = 5,
    precision: str | None = None,
) -> list[dict]:
    """Nearest gallery items of a new ECG (conditioned segments), embedded like the gallery
    (in the gallery's precision unless `precision` is given)."""
    lineage = index.lineage
    checkpoint = lineage.get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_file():
        raise LineageError(
            f"the index's checkpoint {checkpoint} is missing: cannot embed a "
            "new ECG the way the gallery was embedded"
        )
    model = LoadedModel.load(checkpoint)  # one read: hashed and loaded
    precision = precision or lineage.get("precision", "fp32")
    emb = embed_signal(
        model, segments_mv, lead_mask, lineage.get("leads", "12"), precision=precision
    )
    return _matches(
        index, emb, k, {"checkpoint_sha256": model.sha256, "leads": lineage.get("leads")}
    )


def record_trace(store, record_key: str) -> np.ndarray | None:
    key, _, seg = record_key.partition("#")
    hits = np.flatnonzero((store.column("record_key") == key) & store.live)
    if len(hits) == 0:
        return None
    segs = store.record_segments(int(hits[0]))
    return segs[int(seg) if seg else 0]


def plot_matches(
    query: np.ndarray,
    matches: list[dict],
    out: str | os.PathLike,
    store_path: str | None = None,
    title: str = "query",
) -> Path:
    """12-lead traces (first 5 s segment) of the query and its matches side by side."""
    panels = [(title, np.asarray(query))]
    if store_path:
        store = open_store(store_path)
        for m in matches:
            trace = record_trace(store, m["id"])
            if trace is not None:
                panels.append((f"#{m['rank']} {m['id']}\ncos {m['score']:.3f}", trace))
    t = np.arange(panels[0][1].shape[-1]) / 500.0
    fig, axes = pyplot().subplots(
        12, len(panels), figsize=(3.2 * len(panels), 10), sharex=True, squeeze=False
    )
    for col, (name, x) in enumerate(panels):
        axes[0, col].set_title(name, fontsize=8)
        for lead in range(12):
            ax = axes[lead, col]
            ax.plot(t, x[lead], lw=0.5, color="k")
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(LEADS[lead], rotation=0, fontsize=7, labelpad=12)
    for ax in axes[-1]:
        ax.set_xlabel("s", fontsize=7)
    return save_figure(fig, out, dpi=100)
