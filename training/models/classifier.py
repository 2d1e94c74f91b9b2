"""DiagnosisModel: the ECG encoder with a linear multi-label head (fairseq-signals
`ecg_transformer_classifier`, PAPER-ERA `linear_projection`).

frames (B, T', D) -> Dropout(final_dropout) -> padded frames zeroed -> mean over the non-padded
frames -> Linear(D -> 26) (Xavier-uniform weight, zero bias) -> raw logits (B, 26).

The original divides the frame sum by the count of non-zero entries per feature dimension; that
equals the number of non-padded frames except where a feature is exactly 0 (where it can divide
by zero), so the count of non-padded frames is used here.

State dict keys: ``encoder.*`` (the ECGEncoder, loadable by `training.load_encoder`) and
``head.*``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from training.models.encoder import ECGEncoder

NUM_CLASSES = 26


class DiagnosisModel(nn.Module):
    def __init__(self, encoder: ECGEncoder, num_classes: int = NUM_CLASSES, final_dropout: float = 0.0):
        """encoder: a (pretrained) ECGEncoder; num_classes: `num_labels` (26 scored CinC 2021
        classes); final_dropout: `final_dropout`, applied to the frames before pooling."""
        super().__init__()
        self.encoder = encoder
        self.final_dropout = nn.Dropout(final_dropout)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward(self, source: torch.Tensor, lead_mask: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, freeze_encoder: bool = False) -> torch.Tensor:
        """source (B, 12, T) float mV; lead_mask (B, 12) bool (False leads zeroed); padding_mask
        (B, T) bool True = pad; freeze_encoder: run the encoder under no_grad
        (`freeze_finetune_updates`). Returns logits (B, num_classes)."""
        with torch.no_grad() if freeze_encoder else contextlib.nullcontext():
            out = self.encoder.extract_features(source, lead_mask=lead_mask,
                                                padding_mask=padding_mask, mask=False)
        frames = self.final_dropout(out.frames)
        frame_pad = self.encoder.frame_padding_mask(padding_mask, frames.shape[1])
        if frame_pad is not None:
            frames = frames.masked_fill(frame_pad[..., None], 0.0)
        return self.head(ECGEncoder.pool(frames, frame_pad))


def load_diagnosis_model(path, map_location="cpu") -> tuple[DiagnosisModel, dict]:
    """Rebuild a DiagnosisModel from a "diagnosis" checkpoint (strict load), in eval mode.
    Returns ``(model, checkpoint)``; raises CheckpointError naming the file and the reason."""
    from training.models.checkpoint import CheckpointError, load_checkpoint
    from training.models.config import EncoderConfig

    ckpt = load_checkpoint(path, map_location=map_location)
    if ckpt["kind"] != "diagnosis":
        raise CheckpointError(path, f"a {ckpt['kind']!r} checkpoint, not a diagnosis model "
                                    "(fine-tune it with `ecgplat train diagnosis --init`)")
    try:
        encoder = ECGEncoder(EncoderConfig.from_dict(ckpt["encoder_config"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"bad encoder_config: {e}") from None
    head = ckpt["model"].get("head.weight")
    if head is None:
        raise CheckpointError(path, "no classification head (head.weight) in the model weights")
    model = DiagnosisModel(encoder, num_classes=int(head.shape[0]))
    load_strict(model, ckpt["model"], path)
    return model.eval(), ckpt


def load_strict(module: nn.Module, state: dict, path) -> None:
    """``module.load_state_dict(state)`` that raises CheckpointError naming the missing and
    unexpected keys (or the shape mismatch) instead of a multi-line RuntimeError."""
    from training.models.checkpoint import CheckpointError

    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(path, "weights do not fit the model: "
                                    + " ".join(str(e).split())[:300]) from None
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{what} keys {', '.join(keys[:8])}" + (" ..." if len(keys) > 8 else ""))
    if parts:
        raise CheckpointError(path, "; ".join(parts))
