"""Identification metrics (Rank-k, CMC curve, mAP) of gallery rankings, numpy only.

The neighbour-matrix functions take `neighbors (Q, K)` of gallery row indices ordered best
first (-1 for "no result", which FAISS emits when K exceeds what an approximate index can
return), the patient label of every gallery row and of every probe. A probe is correct at rank k
when one of its first k neighbours belongs to its patient; Rank-1 is the top-1 identification
accuracy the paper reports (docs/method.md §6.2). `nearest` ranks a gallery by cosine
similarity of unit embeddings, the paper's rule. `rank_statistics` gives the same CMC and an
exact mAP over the whole gallery without ranking it: only the rank of each gallery item of the
probe's patient is computed. Both share one tie rule (equal scores: the lower gallery row ranks
first) and one formula for each metric. Training's per-epoch validation and retrieval's
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


def _cmc_from_first_hits(first: np.ndarray, depth: int) -> np.ndarray:
    """cmc[k-1] = fraction of probes whose first match is at rank <= k, from each probe's
    1-based rank of its first match (0: none within the ranking)."""
    first = np.asarray(first, dtype=np.int64)
    if len(first) == 0:
        return np.zeros(depth)
    found = first[(first > 0) & (first <= depth)]
    return np.cumsum(np.bincount(found, minlength=depth + 1)[1 : depth + 1]) / len(first)


def _ap_from_hit_ranks(owner: np.ndarray, rank: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """AP per probe = (sum over its matches found of precision at the match) / its number of
    relevant gallery items (NaN when none); `owner` (the probe of each match) ascending and
    `rank` (1-based) ascending within a probe."""
    n_relevant = np.asarray(n_relevant)
    total = np.zeros(len(n_relevant))
    if len(owner):
        hit = np.arange(1, len(owner) + 1) - np.searchsorted(owner, owner, side="left")
        total = np.bincount(owner, weights=hit / rank, minlength=len(n_relevant))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_relevant > 0, total / n_relevant, np.nan)


def cmc_curve(
    neighbors: np.ndarray, gallery_labels: np.ndarray, probe_labels: np.ndarray
) -> np.ndarray:
    """Cumulative match characteristic: cmc[k-1] = fraction of probes correct at rank k."""
    match = match_matrix(neighbors, gallery_labels, probe_labels)
    first = np.where(match.any(axis=1), match.argmax(axis=1) + 1, 0)
    return _cmc_from_first_hits(first, match.shape[1])


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
    n_relevant = np.array([lookup.get(p, 0) for p in probe_labels.tolist()], dtype=np.int64)
    owner, position = np.nonzero(match)  # row-major: each probe's hits in rank order
    return _ap_from_hit_ranks(owner, position + 1, n_relevant)


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


# ------------------------------------------------------------------ rankings without sorting

BLOCK_ELEMENTS = 1 << 24  # similarities held at once (64 MB of float32), whatever the gallery


def _order_keys(score: np.ndarray, row: np.ndarray, col: np.ndarray, col_bits: int) -> np.ndarray:
    """int64 keys, one per (probe row in block, gallery column, float32 score), ordered as the
    ranking is: by row, then score (higher first), then column (lower first). Distinct for
    distinct (row, col), so the tie rule is exact integer order."""
    bits = (np.asarray(score, dtype=np.float32) + np.float32(0)).view(np.int32)  # -0 -> +0
    mono = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits).astype(np.int64) + (1 << 31)
    col_mask = (1 << col_bits) - 1
    return (row.astype(np.int64) << (32 + col_bits)) | (mono << col_bits) | (col_mask - col)


def _relevant_ranks(sim: np.ndarray, owner: np.ndarray, col: np.ndarray) -> np.ndarray:
    """1-based rank of gallery column col[m] in the ranking of block row owner[m] (one row of
    `sim` per probe): 1 + the gallery items scoring higher, or equal at a lower column. Only
    items scoring at least the row's lowest relevant score can rank above one; they are counted
    against the sorted relevant keys, so no row is ever sorted."""
    col_bits = max(1, (sim.shape[1] - 1).bit_length())
    if len(sim) > 1 << (31 - col_bits):
        raise ValueError(f"{len(sim)} probe rows x {sim.shape[1]} gallery items exceed int64 keys")
    score = sim[owner, col]
    floor = np.full(len(sim), np.inf, dtype=np.float32)
    np.minimum.at(floor, owner, score)
    cand_row, cand_col = np.nonzero(sim >= floor[:, None])
    keys = _order_keys(sim[cand_row, cand_col], cand_row, cand_col, col_bits)
    relevant = _order_keys(score, owner, col, col_bits)
    by_key = np.argsort(relevant)
    below = np.searchsorted(relevant[by_key], keys, side="left")  # relevant keys < each key
    above = np.cumsum(np.bincount(below, minlength=len(relevant) + 1)[::-1])[::-1]
    later_rows = len(keys) - np.cumsum(np.bincount(cand_row, minlength=len(sim)))
    rank = np.empty(len(relevant), dtype=np.int64)
    rank[by_key] = 1 + above[1:] - later_rows[owner[by_key]]
    return rank


def _label_codes(gallery_labels, probe_labels) -> tuple[np.ndarray, np.ndarray]:
    g = np.asarray(gallery_labels)
    p = np.asarray(probe_labels)
    _, codes = np.unique(np.concatenate([g, p]), return_inverse=True)
    return codes[: len(g)], codes[len(g) :]


def _check_inputs(gallery, probe, gallery_labels, probe_labels) -> tuple[np.ndarray, np.ndarray]:
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    probe = np.ascontiguousarray(probe, dtype=np.float32)
    if gallery.ndim != 2 or probe.ndim != 2 or gallery.shape[1] != probe.shape[1]:
        raise ValueError(f"gallery {gallery.shape} and probe {probe.shape} must be (n, dim)")
    if (len(gallery_labels), len(probe_labels)) != (len(gallery), len(probe)):
        raise ValueError("one label per gallery row and per probe row is needed")
    if not (np.isfinite(gallery).all() and np.isfinite(probe).all()):
        raise ValueError("embeddings hold NaN or infinite values")
    return gallery, probe


def rank_statistics(
    gallery: np.ndarray,
    probe: np.ndarray,
    gallery_labels: np.ndarray,
    probe_labels: np.ndarray,
    depth: int | None = None,
    chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """(CMC to `depth` (default: the whole gallery), AP per probe) of ranking the gallery by
    inner product (= cosine for unit rows) with each probe, exactly as a full stable sort would
    (equal scores: lower gallery row first), but in O(gallery) per probe: the probe's
    similarities come from one matrix product per block of probes (`chunk` rows at most, and at
    most BLOCK_ELEMENTS similarities), and only its relevant items (its patient's) are ranked.
    AP is over all of the patient's gallery items (NaN when it has none)."""
    gallery, probe = _check_inputs(gallery, probe, gallery_labels, probe_labels)
    g_code, p_code = _label_codes(gallery_labels, probe_labels)
    n_gallery = len(gallery)
    depth = n_gallery if depth is None else min(depth, n_gallery)
    by_patient = np.argsort(g_code, kind="stable")
    count = np.bincount(g_code, minlength=int(p_code.max(initial=-1)) + 1)
    start = np.cumsum(count) - count
    n_relevant = count[p_code]
    rows = max(1, min(chunk, BLOCK_ELEMENTS // max(n_gallery, 1)))
    first = np.zeros(len(probe), dtype=np.int64)
    ap = np.empty(len(probe))
    for s in range(0, len(probe), rows):
        block = slice(s, s + rows)
        n = n_relevant[block]
        owner = np.repeat(np.arange(len(n)), n)
        offset = np.arange(len(owner)) - np.repeat(np.cumsum(n) - n, n)
        col = by_patient[start[p_code[block]][owner] + offset]
        rank = _relevant_ranks(probe[block] @ gallery.T, owner, col)
        order = np.lexsort((rank, owner))
        owner, rank = owner[order], rank[order]
        heads = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]]) if len(owner) else owner
        first[s + owner[heads]] = rank[heads]
        ap[block] = _ap_from_hit_ranks(owner, rank, n)
    return _cmc_from_first_hits(first, depth), ap


def rank1_band(rank1: float, n_evaluated: int, n_total: int) -> float:
    """Half-width of the 95 % normal band of a Rank-1 measured on `n_evaluated` probes drawn
    uniformly without replacement from `n_total`: 1.96 * sqrt(r (1 - r) / n) times the
    finite-population factor sqrt((N - n) / (N - 1)), so 0 when every probe is evaluated."""
    if n_evaluated <= 0 or not np.isfinite(rank1):
        return float("nan")
    fpc = (n_total - n_evaluated) / (n_total - 1) if n_total > 1 else 0.0
    return float(1.96 * np.sqrt(rank1 * (1.0 - rank1) / n_evaluated * fpc))
