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


class RecordLookup:
    """A store's live records by key, with their rows in the record level of one feature set
    and their patient keys, read once: what `query_record` needs for every query of a
    long-running service (`query_record` without one reads them for its one query)."""

    def __init__(self, store_path, features: str):
        self.store = open_store(store_path)
        self.store_path, self.name = store_path, features
        self.features = open_features(store_path, features, "record")
        live = self.store.live
        keys = self.store.column("record_key")
        self.record_of = {str(keys[i]): int(i) for i in np.flatnonzero(live)}
        self.row_of: dict[int, int] = {}
        for row, rec in enumerate(self.features.record_index.tolist()):
            self.row_of.setdefault(int(rec), row)  # the first row of a record, as before
        self._patients: np.ndarray | None = None

    def record(self, record_key: str) -> int:
        """The store's record index of a live record; KeyError naming the store otherwise."""
        if record_key not in self.record_of:
            raise KeyError(f"{self.store_path}: no record {record_key!r}")
        return self.record_of[record_key]

    def embedding(self, record_key: str) -> np.ndarray:
        """The record's stored embedding (D,); KeyError / FeatureError (one line) otherwise."""
        rec = self.record(record_key)
        if rec not in self.row_of:
            raise FeatureError(
                f"{self.store_path}: record {record_key!r} has no embedding in {self.name!r} "
                f"(embedded before it was ingested? re-run `ecgplat embed`)"
            )
        return self.features.rows[np.array([self.row_of[rec]])][0]

    def patient_key(self, record_key: str) -> str:
        if self._patients is None:
            self._patients = self.store.column("patient_key")
        return str(self._patients[self.record(record_key)])


def query_record(
    index: GalleryIndex, record_key: str, k: int = 5, lookup: RecordLookup | None = None
) -> list[dict]:
    """Nearest gallery items of a record of the index's store (the record itself excluded);
    `lookup` (of the index's store and feature set) saves reading them for this query."""
    lineage = index.lineage
    store_path, name = lineage.get("store"), lineage.get("features")
    if not store_path or not name:
        raise LineageError("the index does not name the store and feature set it was built from")
    if lookup is None:
        lookup = RecordLookup(store_path, name)
    level = lineage.get("level", "record")
    embedding = lookup.embedding(record_key)
    skip = record_key if level == "record" else None
    matches = _matches(
        index,
        embedding,
        k,
        lookup.features.lineage,
        skip_id=skip,
        label=lookup.patient_key(record_key),
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
    model: LoadedModel | None = None,
    label: str | None = None,
) -> list[dict]:
    """Nearest gallery items of a new ECG (conditioned segments), embedded like the gallery
    (in the gallery's precision unless `precision` is given). `model`: the index's checkpoint
    already loaded (a service loads it once; refused when it is another checkpoint); `label`:
    the ECG's patient key when known, for the same-patient flags."""
    lineage = index.lineage
    if model is None:
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
        index,
        emb,
        k,
        {"checkpoint_sha256": model.sha256, "leads": lineage.get("leads")},
        label=label,
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
