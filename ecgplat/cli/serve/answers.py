"""What the service's routes answer, computed in its worker threads: a stored record's segments,
metadata (no identifiers) and plot, the traces the page draws, and the rows of `ecgplat predict`
and `ecgplat explain` for one record."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from ecgplat.cli.serve.uploads import Upload
from ecgplat.labels import ABBREVIATIONS
from ecgplat.leads import LEADS

TRACE_STEP = 2  # traces carry every 2nd sample of the 500 Hz segment (250 Hz): enough to see


class Refused(Exception):
    """A request the answer cannot be given for: `status` and a one-line `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def trace(segment_mv: np.ndarray, lead_mask) -> dict:
    x = np.asarray(segment_mv, dtype=np.float32)[:, ::TRACE_STEP]
    return {
        "fs": 500 // TRACE_STEP,
        "leads": list(LEADS),
        "lead_mask": [bool(v) for v in lead_mask],
        "mv": np.round(x.astype(np.float64), 3).tolist(),
    }


def upload_info(up: Upload) -> dict:
    return {
        "upload": {
            "format": up.format,
            "fs_original": up.fs_original,
            "seconds": round(up.n_samples_original / up.fs_original, 3),
            "segments": int(len(up.segments)),
            "leads": [lead for lead, on in zip(LEADS, up.lead_mask, strict=True) if on],
        }
    }


def match(m: dict) -> dict:
    out = {"rank": m["rank"], "key": m["id"], "score": m["score"]}
    if "same_patient" in m:
        out["same_patient"] = m["same_patient"]
    return out


def _record_index(lookup, key: str) -> int:
    try:
        return lookup.record(key)
    except KeyError:
        raise Refused(404, f"no record {key!r} in the store") from None


def stored_record(lookup, key: str, limit: int | None = None):
    """(float32 mV segments (S, 12, 2500), lead mask) of a live record (at most `limit`
    segments)."""
    from ecgplat.store import to_millivolts

    store = lookup.store
    i = _record_index(lookup, key)
    lo, hi = store.record_segment_range(i)
    if limit is not None:
        hi = min(hi, lo + limit)
    return to_millivolts(store.read_segments_raw(np.arange(lo, hi))), store.lead_masks[i]


def metadata(lookup, key: str) -> dict:
    store = lookup.store
    i = _record_index(lookup, key)
    one = {
        name: store.column_at(name, [i])[0]
        for name in ("record_key", "source", "fs_original", "n_samples_original", "age", "sex")
    }
    lo, hi = store.record_segment_range(i)
    age = float(one["age"])
    return {
        "key": str(one["record_key"]),
        "source": str(one["source"]),
        "fs_original": float(one["fs_original"]),
        "seconds": round(float(one["n_samples_original"]) / float(one["fs_original"]), 3),
        "segments": int(hi - lo),
        "age": None if math.isnan(age) else age,
        "sex": str(one["sex"]) or None,
        "labels": [ABBREVIATIONS[j] for j in np.flatnonzero(store.labels[i])],
        "leads": [lead for lead, on in zip(LEADS, store.lead_masks[i], strict=True) if on],
        "split": str(store.column("split")[i]) or None,
        "ident_split": str(store.column("ident_split")[i]) or None,
    }


def list_records(store, q: str, split: str | None, limit: int) -> dict:
    keys = store.column("record_key")
    keep = store.live.copy()
    if split:
        keep &= store.column("ident_split") == split
    if q:
        keep &= np.char.find(keys.astype(str), q) >= 0
    rows = np.flatnonzero(keep)
    return {"total": int(len(rows)), "keys": [str(keys[i]) for i in rows[:limit]]}


def plot(lookup, key: str) -> bytes:
    from retrieval.query import plot_matches

    segments, _ = stored_record(lookup, key, 1)
    with tempfile.TemporaryDirectory(prefix="ecgplat-plot-") as tmp:
        return plot_matches(segments[0], [], Path(tmp) / "plot.png", title=key).read_bytes()


def predict(predictor, key: str, segments: np.ndarray, mask: np.ndarray) -> dict:
    """`ecgplat predict`'s row of one record (training.predict), less its key and checkpoint."""
    from training.predict import RecordInput

    (row,) = predictor.predict_records([RecordInput(key, segments, mask)])
    return {k: _jsonable(v) for k, v in row.items() if k not in ("record", "checkpoint_sha256")}


def explain(dep, segments: np.ndarray, mask: np.ndarray, finding: str) -> dict:
    """`ecgplat explain`'s attribution of one output on the first segment, for the page."""
    from training.explain import ExplainError, integrated_gradients, lead_shares, resolve_output
    from training.normalize import normalize_record

    try:
        k = resolve_output(dep.task, finding.strip() or None, None if finding.strip() else 0)
    except ExplainError as e:
        raise Refused(422, str(e).replace("--class", "class")) from None
    mask = np.asarray(mask, dtype=bool)
    x_mv = np.asarray(segments, dtype=np.float32) * mask[None, :, None]
    x = normalize_record(x_mv, dep.normalize)[0]
    attr = integrated_gradients(dep.graph, x, mask, k, steps=32)
    values = attr.values.reshape(len(LEADS), -1, TRACE_STEP).mean(axis=2)
    scale = float(np.abs(values).max()) or 1.0
    shares = lead_shares(attr.values)
    return {
        "class": dep.task["classes"][k],
        "output": k,
        "method": "integrated_gradients",
        "lead_shares": {lead: float(v) for lead, v in zip(LEADS, shares, strict=True)},
        "top_lead": LEADS[int(np.argmax(shares))],
        "attribution": np.round(values / scale, 3).tolist(),
        "convergence_delta": attr.delta,
    }


def task_summary(predictor) -> dict:
    """The task's name, kind, classes and thresholds, and display names: the CinC 2021
    abbreviations for classes of that vocabulary (SNOMED codes), else the classes."""
    from ecgplat.labels import CLASS_NAMES

    task = dict(getattr(predictor, "task", {}) or {})
    out = {k: _jsonable(task.get(k)) for k in ("name", "kind", "classes", "thresholds")}
    abbreviation = dict(zip(CLASS_NAMES, ABBREVIATIONS, strict=True))
    out["names"] = [abbreviation.get(c, c) for c in out["classes"] or []]
    return out


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v
