"""The model-input batch dict, built in one place for training streams, store reads and queries.

A batch holds `source` (B, 12, T) float32 millivolts in canonical lead order, `lead_mask`
(B, 12) bool (leads present and kept), `record_index` (B,) int64 and per-use extras (labels,
segment numbers, CMSC pair positions, patient keys). `make_batch` applies the lead subset
(leads outside it zero-filled and unmasked) and, for training, random lead masking;
`store_batches` streams a store's records through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from ecgplat.leads import LEADS, apply_lead_subset, lead_mask

ALL_LEADS = tuple(range(len(LEADS)))


def make_batch(
    x_mv: np.ndarray,
    present: np.ndarray,
    record_index,
    leads: tuple[int, ...] = ALL_LEADS,
    rlm: Callable | None = None,
    rng: np.random.Generator | None = None,
    **extra,
) -> dict:
    """The batch dict of segments `x_mv` (B, 12, T) mV whose files had the leads `present`
    ((B, 12) or (12,) bool). Leads outside `leads` are zero-filled and masked; then `rlm(x, mask,
    rng)` (random lead masking) when given. `record_index` is an int or (B,) ints; `extra`
    entries are added as given, numpy arrays as tensors."""
    x = np.asarray(x_mv, dtype=np.float32)
    if x.ndim != 3 or x.shape[1] != len(LEADS):
        raise ValueError(f"expected segments (B, 12, T) in mV, got shape {x.shape}")
    mask = np.broadcast_to(np.asarray(present, dtype=bool), (len(x), len(LEADS))).copy()
    if len(leads) < len(LEADS):
        x = apply_lead_subset(x, leads)
        mask &= lead_mask(leads)
    if rlm is not None:
        x, mask = rlm(x, mask, rng)
    rec = np.broadcast_to(np.asarray(record_index, dtype=np.int64), (len(x),))
    batch = {
        "source": torch.from_numpy(np.ascontiguousarray(x)),
        "lead_mask": torch.from_numpy(np.ascontiguousarray(mask)),
        "record_index": torch.from_numpy(rec.copy()),
    }
    for key, value in extra.items():
        batch[key] = (
            torch.from_numpy(np.ascontiguousarray(value))
            if isinstance(value, np.ndarray)
            else value
        )
    return batch


def store_batches(
    store,
    records: Iterable[int],
    leads: tuple[int, ...] = ALL_LEADS,
    batch_size: int = 64,
    on_record: Callable[[], None] | None = None,
) -> Iterator[dict]:
    """Single-segment batches (the `training.data` evaluation form) of the given store records,
    in order: source (B, 12, T) float32 mV with the leads outside `leads` zero-filled,
    lead_mask (B, 12) bool, labels (B, C) float32, record_index, segment_index (B,) int64.
    Each batch is one bulk read of the store (a slice when its segments are contiguous);
    `on_record()` is called once per record whose last segment has been yielded."""
    records = np.asarray(list(records), dtype=np.int64)
    # two columns, not the whole record table (seconds at a million records)
    starts = np.asarray(store.column("seg_start"), dtype=np.int64)[records]
    counts = np.asarray(store.column("seg_count"), dtype=np.int64)[records]
    seg_record = np.repeat(records, counts)
    seg_number = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    seg_rows = np.repeat(starts, counts) + seg_number
    last_of_record = np.cumsum(counts) - 1
    labels, masks = store.labels, store.lead_masks
    for b in range(0, len(seg_rows), batch_size):
        rows = slice(b, b + batch_size)
        rec = seg_record[rows]
        yield make_batch(
            store.read_segments(seg_rows[rows]),
            masks[rec],
            rec,
            leads,
            labels=labels[rec].astype(np.float32),
            segment_index=seg_number[rows].astype(np.int64),
        )
        if on_record is not None:
            for _ in range(int(np.sum((last_of_record >= b) & (last_of_record < b + batch_size)))):
                on_record()
