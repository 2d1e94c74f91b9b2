"""Per-record amplitude normalisation (``data.normalize``), the same at training, fine-tuning,
embedding and query time.

``none`` (the default, the paper's setting) leaves millivolts as they are. ``zscore`` rescales
every lead of a record to zero mean and unit standard deviation over the whole record (all its
stored 5 s segments together); a lead with zero spread (absent, zero-filled) stays all zero. It
lets records in different units (``uV`` and ``z`` in the store) train together. The mode is part
of the run config, so it is saved in every checkpoint; embedding and queries read it back from
the checkpoint (``mode_of``), and feature sets record it in their lineage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

MODES = ("none", "zscore")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"data.normalize must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def lead_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per lead, float64 (12,), over a record's segments ``(S, 12, T)``."""
    x64 = np.asarray(x, dtype=np.float64)
    return x64.mean(axis=(0, 2)), x64.std(axis=(0, 2))


def apply_stats(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` per lead (leads on axis -2) as float32; zero-std leads give zeros."""
    safe = np.where(std > 0, std, 1.0)
    out = (np.asarray(x, dtype=np.float64) - mean[..., :, None]) / safe[..., :, None]
    out[..., std == 0, :] = 0.0
    return out.astype(np.float32)


def normalize_record(x: np.ndarray, mode: str) -> np.ndarray:
    """One record's segments ``(S, 12, T)`` (mV) normalised by ``mode`` (float32)."""
    if check_mode(mode) == "none":
        return np.asarray(x, dtype=np.float32)
    return apply_stats(x, *lead_stats(x))


def mode_of(checkpoint: dict) -> str:
    """The ``data.normalize`` a checkpoint was trained with ("none" for older checkpoints)."""
    config = checkpoint.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    return check_mode(str(data.get("normalize", "none")) if isinstance(data, dict) else "none")


def normalize_store_batches(
    store,
    batches: Iterable[dict],
    mode: str,
    leads: tuple[int, ...] | None = None,
    stats: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None,
) -> Iterator[dict]:
    """Store batches (``training.batch.store_batches``: segments in record order,
    ``record_index`` per row) normalised per record with the statistics of the whole record,
    exactly as ``normalize_record`` on the record; leads outside ``leads`` stay zero.
    ``stats(r)``: ``lead_stats`` of record ``r`` from segments the caller has already read
    (asked while ``r``'s batch is the latest drawn from ``batches``); by default the record is
    read from the store again."""
    import torch

    from ecgplat.leads import lead_mask

    if check_mode(mode) == "none":
        yield from batches
        return
    keep = lead_mask(leads) if leads is not None else np.ones(12, dtype=bool)
    stats = stats or (lambda r: lead_stats(store.record_segments(r)))
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for batch in batches:
        rec = batch["record_index"].numpy()
        x = batch["source"].numpy()
        out = np.empty_like(x)
        for r in np.unique(rec):
            if int(r) not in cache:
                cache.clear()  # records arrive in order: one record's stats at a time
                cache[int(r)] = stats(int(r))
            rows = rec == r
            out[rows] = apply_stats(x[rows], *cache[int(r)])
        out[:, ~keep] = 0.0
        yield dict(batch, source=torch.from_numpy(out))
