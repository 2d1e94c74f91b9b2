"""Mean pooling of the encoder's frames: the representation under both fine-tuning heads
(the diagnosis classifier and the ArcFace identifier) and the embeddings written to the store."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from training.models.encoder import ECGEncoder


def pooled_output(
    encoder: ECGEncoder,
    source: torch.Tensor,
    lead_mask: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    final_dropout: nn.Module | None = None,
    freeze_encoder: bool = False,
) -> torch.Tensor:
    """Encoder frames (B, T', D) -> final_dropout -> padded frames zeroed -> mean over the
    non-padded frames (B, D). freeze_encoder runs the encoder under no_grad
    (`freeze_finetune_updates`)."""
    with torch.no_grad() if freeze_encoder else contextlib.nullcontext():
        out = encoder.extract_features(
            source, lead_mask=lead_mask, padding_mask=padding_mask, mask=False
        )
    frames = out.frames if final_dropout is None else final_dropout(out.frames)
    frame_pad = encoder.frame_padding_mask(padding_mask, frames.shape[1])
    if frame_pad is not None:
        frames = frames.masked_fill(frame_pad[..., None], 0.0)
    return ECGEncoder.pool(frames, frame_pad)
