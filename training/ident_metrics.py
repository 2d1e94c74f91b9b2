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

from ecgplat.allocator import release_free_memory


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

BLOCK_ELEMENTS = 1 << 20  # similarities held at once (4 MB of float32), whatever the gallery
GALLERY_CHUNK = 1 << 14  # gallery rows held at once (4 MB at dim 64), whatever the gallery


def _order_keys(
    score: np.ndarray, row: np.ndarray, col: np.ndarray, col_bits: int, col_offset: int = 0
) -> np.ndarray:
    """int64 keys, one per (probe row in block, gallery column col + col_offset, float32 score),
    ordered as the ranking is: by row, then score (higher first), then column (lower first).
    Distinct for distinct (row, col), so the tie rule is exact integer order. Built in place:
    the candidates of a block can number BLOCK_ELEMENTS."""
    bits = np.add(score, np.float32(0), dtype=np.float32).view(np.int32)  # -0 -> +0
    np.bitwise_xor(bits, np.int32(0x7FFFFFFF), out=bits, where=bits < 0)  # monotone in score
    key = bits.astype(np.int64)
    del bits
    key += 1 << 31
    key <<= col_bits
    key |= np.left_shift(row, 32 + col_bits, dtype=np.int64)
    key |= ((1 << col_bits) - 1 - col_offset) - np.asarray(col, dtype=np.int64)
    return key


def _items_ranked_above(
    sim: np.ndarray,
    lo: int,
    owner: np.ndarray,
    score: np.ndarray,
    col: np.ndarray,
    floor: np.ndarray,
    col_bits: int,
) -> np.ndarray:
    """For each relevant pair m (block row owner[m], gallery column col[m], its score), the
    number of gallery columns lo + j of this part (`sim` row = the block's probe) that rank
    above it: a higher score, or an equal one at a lower column. Only items scoring at least
    the row's lowest relevant score (`floor`) can; they are counted against the sorted relevant
    keys, so no row is ever sorted."""
    cand_row, cand_col = np.nonzero(sim >= floor[:, None])
    keys = _order_keys(sim[cand_row, cand_col], cand_row, cand_col, col_bits, lo)
    relevant = _order_keys(score, owner, col, col_bits)
    by_key = np.argsort(relevant)
    below = np.searchsorted(relevant[by_key], keys, side="left")  # relevant keys < each key
    above = np.cumsum(np.bincount(below, minlength=len(relevant) + 1)[::-1])[::-1]
    later_rows = len(keys) - np.cumsum(np.bincount(cand_row, minlength=len(sim)))
    out = np.empty(len(relevant), dtype=np.int64)
    out[by_key] = above[1:] - later_rows[owner[by_key]]
    return out


def _label_codes(gallery_labels, probe_labels) -> tuple[np.ndarray, np.ndarray]:
    """Equal labels -> equal small non-negative ints. Labels that already are such codes (e.g.
    `EcgStore.column_codes`) are kept: no sort of every label."""
    g = np.asarray(gallery_labels)
    p = np.asarray(probe_labels)
    if g.dtype.kind in "iu" and p.dtype.kind in "iu":
        low = min(g.min(initial=0), p.min(initial=0))
        high = max(g.max(initial=0), p.max(initial=0))
        if low >= 0 and high <= 4 * (len(g) + len(p)):
            return g.astype(np.int64, copy=False), p.astype(np.int64, copy=False)
    _, codes = np.unique(np.concatenate([g, p]), return_inverse=True)
    return codes[: len(g)], codes[len(g) :]


def _check_inputs(gallery, probe, gallery_labels, probe_labels) -> tuple[object, np.ndarray]:
    if not hasattr(gallery, "shape"):
        gallery = np.asarray(gallery, dtype=np.float32)
    probe = np.ascontiguousarray(probe, dtype=np.float32)
    shape = tuple(gallery.shape)
    if len(shape) != 2 or probe.ndim != 2 or shape[1] != probe.shape[1]:
        raise ValueError(f"gallery {shape} and probe {probe.shape} must be (n, dim)")
    if (len(gallery_labels), len(probe_labels)) != (shape[0], len(probe)):
        raise ValueError("one label per gallery row and per probe row is needed")
    if not np.isfinite(probe).all():
        raise ValueError("embeddings hold NaN or infinite values")
    return gallery, probe


def _gallery_part(gallery, lo: int, hi: int) -> np.ndarray:
    part = np.ascontiguousarray(gallery[lo:hi], dtype=np.float32)
    if not np.isfinite(part).all():
        raise ValueError("embeddings hold NaN or infinite values")
    return part


def rank_statistics(
    gallery,
    probe: np.ndarray,
    gallery_labels: np.ndarray,
    probe_labels: np.ndarray,
    depth: int | None = None,
    chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """(CMC to `depth` (default: the whole gallery), AP per probe) of ranking the gallery by
    inner product (= cosine for unit rows) with each probe, exactly as a full stable sort would
    (equal scores: lower gallery row first), but in O(gallery) per probe and in memory bounded
    whatever the gallery's size.

    `gallery` is an (n, dim) array or anything with `shape`, `len()` and row slicing that
    returns arrays (a stored feature set read on demand): it is read `GALLERY_CHUNK` rows at a
    time, twice. Similarities come from one matrix product per block of probes (`chunk` rows at
    most, and at most BLOCK_ELEMENTS similarities) and gallery part; the first pass keeps the
    score of each relevant item (one of the probe's patient), the second counts, part by part,
    the items ranked above each relevant item. Both passes make the same products, so a
    relevant item's score is bit-identical in both. AP is over all of the patient's gallery
    items (NaN when it has none)."""
    gallery, probe = _check_inputs(gallery, probe, gallery_labels, probe_labels)
    g_code, p_code = _label_codes(gallery_labels, probe_labels)
    n_gallery = len(g_code)
    depth = n_gallery if depth is None else min(depth, n_gallery)
    by_patient = np.argsort(g_code, kind="stable")
    count = np.bincount(g_code, minlength=int(p_code.max(initial=-1)) + 1)
    start = np.cumsum(count) - count
    n_relevant = count[p_code]
    # every (probe, relevant gallery row) pair, probe-major
    owner = np.repeat(np.arange(len(probe)), n_relevant)
    offset = np.arange(len(owner)) - np.repeat(np.cumsum(n_relevant) - n_relevant, n_relevant)
    col = by_patient[start[p_code][owner] + offset]
    width = max(1, min(n_gallery, GALLERY_CHUNK))
    col_bits = max(1, (n_gallery - 1).bit_length())
    rows = max(1, min(chunk, BLOCK_ELEMENTS // width, 1 << max(0, 31 - col_bits)))
    firsts = np.arange(0, len(probe), rows)
    bounds = np.searchsorted(owner, np.r_[firsts, len(probe)])  # pairs of each block
    score = np.empty(len(owner), dtype=np.float32)
    above = np.zeros(len(owner), dtype=np.int64)
    floor = np.full(len(probe), np.inf, dtype=np.float32)
    for counting in (False, True):
        if counting:
            np.minimum.at(floor, owner, score)
        for lo in range(0, n_gallery, width):
            part = _gallery_part(gallery, lo, min(n_gallery, lo + width))
            for b, s in enumerate(firsts):
                a, z = bounds[b], bounds[b + 1]
                if a == z:  # no probe of the block has gallery items
                    continue
                sim = probe[s : s + rows] @ part.T
                if counting:
                    above[a:z] += _items_ranked_above(
                        sim, lo, owner[a:z] - s, score[a:z], col[a:z], floor[s : s + rows], col_bits
                    )
                    release_free_memory()  # the block's temporaries, not their sum over blocks
                else:
                    m = a + np.flatnonzero((col[a:z] >= lo) & (col[a:z] < lo + len(part)))
                    score[m] = sim[owner[m] - s, col[m] - lo]
    rank = 1 + above
    order = np.lexsort((rank, owner))
    owner, rank = owner[order], rank[order]
    heads = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]]) if len(owner) else owner
    first = np.zeros(len(probe), dtype=np.int64)
    first[owner[heads]] = rank[heads]
    return _cmc_from_first_hits(first, depth), _ap_from_hit_ranks(owner, rank, n_relevant)


def rank1_band(rank1: float, n_evaluated: int, n_total: int) -> float:
    """Half-width of the 95 % normal band of a Rank-1 measured on `n_evaluated` probes drawn
    uniformly without replacement from `n_total`: 1.96 * sqrt(r (1 - r) / n) times the
    finite-population factor sqrt((N - n) / (N - 1)), so 0 when every probe is evaluated."""
    if n_evaluated <= 0 or not np.isfinite(rank1):
        return float("nan")
    fpc = (n_total - n_evaluated) / (n_total - 1) if n_total > 1 else 0.0
    return float(1.96 * np.sqrt(rank1 * (1.0 - rank1) / n_evaluated * fpc))
