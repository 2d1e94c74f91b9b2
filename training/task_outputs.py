"""Head outputs of a fine-tuned model over batches, and their record-level aggregation.

`raw_outputs` runs a model (encoder + linear head, in eval mode) over store or shard batches
and keeps its raw outputs (logits, or standardised values for regression) with each segment's
record and segment number; `record_level` averages a record's segment probabilities (or
values) into one row, the unit of thresholds, `predict` and the record-level report.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Outputs:
    logits: np.ndarray  # (N, outputs) float32, raw head outputs
    record_index: np.ndarray  # (N,) int64
    segment_index: np.ndarray  # (N,) int64
    labels: np.ndarray | None = None  # (N, 26) of the batches (diagnosis), when asked for


def raw_outputs(
    model: torch.nn.Module,
    batches: Iterable[dict],
    precision: str = "auto",
    keep_labels: bool = False,
) -> Outputs:
    """The model's outputs for every batch (already normalised, lead subset applied), under
    `precision`'s autocast; each batch is read one ahead of the model in a thread."""
    from training.precision import autocast as precision_autocast
    from training.prefetch import prefetch

    device = next(model.parameters()).device
    autocast = precision_autocast(precision, device)
    z, r, s, y = [], [], [], []
    with torch.inference_mode():
        for batch in prefetch(batches, depth=2):
            with autocast:
                out = model(batch["source"].to(device), lead_mask=batch["lead_mask"].to(device))
            z.append(out.float().cpu().numpy())
            r.append(batch["record_index"].numpy())
            seg = batch.get("segment_index")
            s.append(seg.numpy() if seg is not None else np.zeros(len(out), np.int64))
            if keep_labels:
                y.append(batch["labels"].numpy() > 0.5)
    n_out = int(getattr(model, "num_classes", 1))
    if not z:
        empty = np.zeros(0, np.int64)
        return Outputs(np.zeros((0, n_out), np.float32), empty, empty, None)
    return Outputs(
        np.concatenate(z).astype(np.float32),
        np.concatenate(r).astype(np.int64),
        np.concatenate(s).astype(np.int64),
        np.concatenate(y) if keep_labels else None,
    )


def record_level(values: np.ndarray, record_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct records, (R, C) mean of their rows)."""
    v = np.asarray(values, dtype=np.float64).reshape(len(record_index), -1)
    records, inverse = np.unique(record_index, return_inverse=True)
    sums = np.zeros((len(records), v.shape[1]))
    np.add.at(sums, inverse, v)
    return records, sums / np.bincount(inverse, minlength=len(records))[:, None]
