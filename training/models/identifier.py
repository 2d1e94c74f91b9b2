"""IdentificationModel: encoder + mean-pool + L2 normalisation -> embedding, with an ArcFace head.

fairseq-signals' `arcface` model (docs/method.md §6.1): frames (B, T', D) -> Dropout(final_dropout)
-> mean over time -> L2 normalise -> e (B, D), ‖e‖ = 1, no projection layer. The embedding is the
identification feature: gallery and probe ECGs are compared by the cosine similarity of their
embeddings (the PAPER-ERA evaluation, docs/method.md §6.2; HEAD's comparison of class-similarity
vectors is a regression and is not reproduced).

State dict keys: ``encoder.*`` (loadable by `training.load_encoder`) and ``arcface.kernel``.

Also here, because the diagnosis model, training validation and `retrieval` share them:
`pooled_output` (from `training.models.pooling`; also under the diagnosis head),
`embed_batches` (batched inference of unit embeddings, any encoder), `record_means`
(per-record embeddings) and `load_identification_model`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.models.encoder import ECGEncoder
from training.models.pooling import pooled_output
from training.objectives.arcface import ArcFaceHead, arcface_loss


def unit_embedding(
    encoder: ECGEncoder,
    source: torch.Tensor,
    lead_mask: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    final_dropout: nn.Module | None = None,
    freeze_encoder: bool = False,
) -> torch.Tensor:
    """L2-normalised mean-pooled encoder output (B, D) in float32."""
    pooled = pooled_output(encoder, source, lead_mask, padding_mask, final_dropout, freeze_encoder)
    return F.normalize(pooled.float(), dim=-1)


class IdentificationModel(nn.Module):
    def __init__(
        self,
        encoder: ECGEncoder,
        num_classes: int,
        scale: float = 192.0,
        margin: float = 1.0,
        final_dropout: float = 0.0,
    ):
        """encoder: a (pretrained) ECGEncoder; num_classes: `num_labels` (training patients);
        scale / margin: `criterion.scale` / `criterion.margin` (paper: 192, 1.0);
        final_dropout: `final_dropout` on the frames before pooling (paper: 0)."""
        super().__init__()
        self.encoder = encoder
        self.final_dropout = nn.Dropout(final_dropout)
        self.arcface = ArcFaceHead(encoder.embed_dim, num_classes, scale=scale, margin=margin)

    @property
    def num_classes(self) -> int:
        return self.arcface.num_classes

    def embed(
        self,
        source: torch.Tensor,
        lead_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        freeze_encoder: bool = False,
    ) -> torch.Tensor:
        """Unit embeddings (B, D); freeze_encoder runs the encoder under no_grad
        (`freeze_finetune_updates`)."""
        return unit_embedding(
            self.encoder, source, lead_mask, padding_mask, self.final_dropout, freeze_encoder
        )

    def forward(
        self,
        source: torch.Tensor,
        labels: torch.Tensor | None = None,
        lead_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        freeze_encoder: bool = False,
    ):
        """Without labels: the embeddings. With labels (B,) class indices: the ArcFace loss
        `(loss summed over the batch, B, logs)` (see `training.objectives.arcface`)."""
        e = self.embed(source, lead_mask, padding_mask, freeze_encoder)
        if labels is None:
            return e
        return arcface_loss(self.arcface, e, labels.to(e.device))


@torch.inference_mode()
def embed_batches(
    model: nn.Module,
    batches: Iterable[dict],
    device: torch.device | None = None,
    precision: str = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit embeddings of every segment of `batches` (the `store_batches` / training.data form).

    `model` is an ECGEncoder or an IdentificationModel; it is run in eval mode and put back.
    `precision` (auto | fp32 | bf16, see training.precision) is the autocast of the forward
    passes; the embeddings are float32 either way. `batches` are read one ahead in a thread.
    Returns (embeddings float32 (N, D), record_index int64 (N,), segment_index int64 (N,)).
    """
    from training.precision import autocast as precision_autocast
    from training.prefetch import prefetch

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    encoder = model.encoder if isinstance(model, IdentificationModel) else model
    autocast = precision_autocast(precision, device)
    embs, recs, segs = [], [], []
    try:
        for batch in prefetch(batches, depth=2):
            x = batch["source"].to(device, non_blocking=True)
            mask = batch.get("lead_mask")
            with autocast:
                e = unit_embedding(encoder, x, None if mask is None else mask.to(device))
            embs.append(e.float().cpu().numpy())
            recs.append(np.asarray(batch["record_index"], dtype=np.int64))
            segs.append(np.asarray(batch.get("segment_index", np.zeros(len(x))), dtype=np.int64))
    finally:
        model.train(was_training)
    if not embs:
        width = encoder.embed_dim
        return np.zeros((0, width), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(embs), np.concatenate(recs), np.concatenate(segs)


def record_means(embeddings: np.ndarray, record_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-record embeddings: the mean of each record's segment embeddings, re-normalised.
    Returns (record indices in first-seen order, float32 (R, D) unit rows)."""
    records, first, inverse = np.unique(record_index, return_index=True, return_inverse=True)
    sums = np.zeros((len(records), embeddings.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, embeddings)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    means = (sums / np.maximum(norms, 1e-12)).astype(np.float32)
    order = np.argsort(first, kind="stable")
    return records[order].astype(np.int64), means[order]


def load_identification_model(path, map_location="cpu") -> tuple[IdentificationModel, dict]:
    """Rebuild an IdentificationModel from an "identify" checkpoint (strict load), in eval mode.
    Returns ``(model, checkpoint)``; raises CheckpointError naming the file and the reason."""
    from training.models.checkpoint_file import load_finetuned

    def build(encoder: ECGEncoder, num_classes: int, ckpt: dict) -> IdentificationModel:
        crit = (ckpt.get("config") or {}).get("criterion", {})
        return IdentificationModel(
            encoder,
            num_classes,
            scale=crit.get("arcface_scale", 192.0),
            margin=crit.get("arcface_margin", 1.0),
        )

    return load_finetuned(
        path,
        "identify",
        "an identification model",
        "arcface.kernel",
        "ArcFace head",
        build,
        map_location=map_location,
    )
