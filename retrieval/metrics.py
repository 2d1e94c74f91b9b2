"""Identification metrics of retrieval (Rank-k, CMC, mAP): their one home is
`training.ident_metrics`, shared with training's validation; re-exported here."""

from training.ident_metrics import (
    average_precision,
    cmc_curve,
    mean_average_precision,
    nearest,
    rank_k,
    ranks_from_cmc,
)

__all__ = [
    "average_precision",
    "cmc_curve",
    "mean_average_precision",
    "nearest",
    "rank_k",
    "ranks_from_cmc",
]
