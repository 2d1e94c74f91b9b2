"""Identification metrics (Rank-k, CMC curve, mAP) from ranked gallery results, numpy only.

Every function takes a neighbour matrix `neighbors (Q, K)` of gallery row indices ordered best
first (-1 for "no result", which FAISS emits when K exceeds what an approximate index can
return), the patient label of every gallery row and of every probe. A probe is correct at rank k
when one of its first k neighbours belongs to its patient; Rank-1 is the top-1 identification
accuracy the paper reports (docs/method.md §6.2). `nearest` ranks a gallery by cosine
similarity of unit embeddings, the paper's rule. Training's per-epoch validation and retrieval's
evaluation both use this module.
"""

from __future__ import annotations

import numpy as np


def nearest(gallery: np.ndarray, probe: np.ndarray, k: int = 1, chunk: int = 1024) -> np.ndarray:
    """(Q, min(k, G)) gallery rows of highest inner product (= cosine for unit rows) per probe,
    best first, ties to the lower row; probes are scored `chunk` at a time to bound memory."""
    gallery = np.asarray(gallery, dtype=np.float32)
    probe = np.asarray(probe, dtype=np.float32)
    k = min(k, len(gallery))
    out = np.empty((len(probe), k), dtype=np.int64)
    for s in range(0, len(probe), chunk):
        sim = probe[s : s + chunk] @ gallery.T
        if k == 1:
            out[s : s + chunk, 0] = sim.argmax(axis=1)
        else:
            out[s : s + chunk] = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return out


def match_matrix(
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
    match = match_matrix(neighbors, gallery_labels, probe_labels)
    if match.shape[0] == 0:
        return np.zeros(match.shape[1])
    hit_by_rank = np.logical_or.accumulate(match, axis=1)
    return hit_by_rank.mean(axis=0)


def ranks_from_cmc(cmc: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """{k: Rank-k accuracy} read off a CMC curve; k beyond its depth uses the deepest rank."""
    if len(cmc) == 0:
        raise ValueError("Rank-k needs at least one neighbour per probe")
    return {k: float(cmc[min(k, len(cmc)) - 1]) for k in ks}


def rank_k(
    neighbors: np.ndarray,
    gallery_labels: np.ndarray,
    probe_labels: np.ndarray,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[int, float]:
    """{k: Rank-k accuracy}; k larger than the searched depth uses the deepest rank available."""
    return ranks_from_cmc(cmc_curve(neighbors, gallery_labels, probe_labels), ks)


def average_precision(
    neighbors: np.ndarray, gallery_labels: np.ndarray, probe_labels: np.ndarray
) -> np.ndarray:
    """AP per probe over the gallery items of the probe's patient (NaN when it has none).

    `neighbors` must rank the whole gallery (K = n_gallery) for the AP to be exact; the number of
    relevant items is counted from `gallery_labels`, so a truncated ranking gives a lower bound.
    """
    gallery_labels = np.asarray(gallery_labels)
    probe_labels = np.asarray(probe_labels)
    match = match_matrix(neighbors, gallery_labels, probe_labels)
    uniq, counts = np.unique(gallery_labels, return_counts=True)
    lookup = dict(zip(uniq.tolist(), counts.tolist(), strict=True))
    n_relevant = np.array([lookup.get(p, 0) for p in probe_labels.tolist()], dtype=np.float64)
    hits = np.cumsum(match, axis=1)
    ranks = np.arange(1, match.shape[1] + 1)
    precision_at_hits = np.where(match, hits / ranks, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_relevant > 0, precision_at_hits / n_relevant, np.nan)


def chance_rank1(gallery_labels: np.ndarray, probe_labels: np.ndarray) -> float:
    """Rank-1 accuracy of a random ranking: the mean over probes of the fraction of the gallery
    that shares the probe's label. Linear in the sizes (one count per gallery label), not one
    comparison per (probe, gallery) pair."""
    if len(probe_labels) == 0 or len(gallery_labels) == 0:
        return float("nan")
    uniq, counts = np.unique(np.asarray(gallery_labels).astype(str), return_counts=True)
    share = dict(zip(uniq.tolist(), (counts / len(gallery_labels)).tolist(), strict=True))
    return float(np.mean([share.get(str(x), 0.0) for x in np.asarray(probe_labels).tolist()]))


def mean_average_precision(
    neighbors: np.ndarray, gallery_labels: np.ndarray, probe_labels: np.ndarray
) -> float:
    """mAP over probes whose patient has at least one gallery item."""
    ap = average_precision(neighbors, gallery_labels, probe_labels)
    ap = ap[~np.isnan(ap)]
    return float(ap.mean()) if len(ap) else float("nan")
