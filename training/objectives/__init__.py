"""Training objectives: the pretraining terms (wav2vec 2.0 InfoNCE + diversity + feature
penalty, CMSC) and their combined criterion; ArcFace lives in `training.objectives.arcface`."""

from training.objectives.cmsc import cmsc_embeddings, cmsc_loss, l2_normalize, mean_pool
from training.objectives.criterion import PretrainCriterion
from training.objectives.wav2vec2 import (
    Wav2Vec2Terms,
    contrastive_logits,
    diversity_loss,
    infonce_accuracy,
    infonce_loss,
    sample_negatives,
    wav2vec2_terms,
)

__all__ = [
    "PretrainCriterion",
    "Wav2Vec2Terms",
    "cmsc_embeddings",
    "cmsc_loss",
    "contrastive_logits",
    "diversity_loss",
    "infonce_accuracy",
    "infonce_loss",
    "l2_normalize",
    "mean_pool",
    "sample_negatives",
    "wav2vec2_terms",
]
