"""Identification metrics from ranked gallery results: Rank-k, CMC curve and mAP.

All functions take the neighbour matrix a FAISS search returns, `neighbors (Q, K)` of gallery
row indices ordered best first (-1 for "no result", which FAISS emits when K exceeds what an
approximate index can return), together with the patient label of every gallery row and of
every probe. A probe is correct at rank k when one of its first k neighbours belongs to its
patient (the paper reports Rank-1 = top-1 identification accuracy, spec §3.7).
"""

from __future__ import annotations

import numpy as np


def _match_matrix(
    neighbors: np.ndarray, gallery_labels: np.ndarray, probe_labels: np.ndarray
) -> np.ndarray:
    """bool (Q, K): neighbour j of probe i has the probe's patient label."""
    neighbors = np.asarray(neighbors)
    gallery_labels = np.asarray(gallery_labels)
    probe_labels = np.asarray(probe_labels)
    if neighbors.ndim != 2 or neighbors.shape[0] != len(probe_labels):
        raise ValueError(
            f"neighbors must be (n_probe={len(probe_labels)}, K), got {neighbors.shape}"
        )
    valid = neighbors >= 0
    labels = gallery_labels[np.where(valid, neighbors, 0)]
    return valid & (labels == probe_labels[:, None])


def cmc_curve(
    neighbors: np.ndarray, gallery_labels: np.ndarray, probe_labels: np.ndarray
) -> np.ndarray:
    """Cumulative match characteristic: cmc[k-1] = fraction of probes correct at rank k."""
    match = _match_matrix(neighbors, gallery_labels, probe_labels)
    if match.shape[0] == 0:
        return np.zeros(match.shape[1])
    hit_by_rank = np.logical_or.accumulate(match, axis=1)
    return hit_by_rank.mean(axis=0)


def rank_k(
    neighbors: np.ndarray,
    gallery_labels: np.ndarray,
    probe_labels: np.ndarray,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[int, float]:
    """{k: Rank-k accuracy}; k larger than the searched depth uses the deepest rank available."""
    cmc = cmc_curve(neighbors, gallery_labels, probe_labels)
    if len(cmc) == 0:
        raise ValueError("rank_k needs at least one neighbour per probe")
    return {k: float(cmc[min(k, len(cmc)) - 1]) for k in ks}


def average_precision(
    neighbors: np.ndarray, gallery_labels: np.ndarray, probe_labels: np.ndarray
) -> np.ndarray:
    """AP per probe over the gallery items of the probe's patient (NaN when it has none).

    `neighbors` must rank the whole gallery (K = n_gallery) for the AP to be exact; the number of
    relevant items is counted from `gallery_labels`, so a truncated ranking gives a lower bound.
    """
    gallery_labels = np.asarray(gallery_labels)
    probe_labels = np.asarray(probe_labels)
    match = _match_matrix(neighbors, gallery_labels, probe_labels)
    uniq, counts = np.unique(gallery_labels, return_counts=True)
    lookup = dict(zip(uniq.tolist(), counts.tolist()))
    n_relevant = np.array([lookup.get(p, 0) for p in probe_labels.tolist()], dtype=np.float64)
    hits = np.cumsum(match, axis=1)
    ranks = np.arange(1, match.shape[1] + 1)
    precision_at_hits = np.where(match, hits / ranks, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_relevant > 0, precision_at_hits / n_relevant, np.nan)


def mean_average_precision(
    neighbors: np.ndarray, gallery_labels: np.ndarray, probe_labels: np.ndarray
) -> float:
    """mAP over probes whose patient has at least one gallery item."""
    ap = average_precision(neighbors, gallery_labels, probe_labels)
    ap = ap[~np.isnan(ap)]
    return float(ap.mean()) if len(ap) else float("nan")
