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

import torch
from torch import nn

from training.models.encoder import ECGEncoder
from training.models.pooling import pooled_output

NUM_CLASSES = 26


class DiagnosisModel(nn.Module):
    def __init__(
        self, encoder: ECGEncoder, num_classes: int = NUM_CLASSES, final_dropout: float = 0.0
    ):
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

    def forward(
        self,
        source: torch.Tensor,
        lead_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        freeze_encoder: bool = False,
    ) -> torch.Tensor:
        """source (B, 12, T) float mV; lead_mask (B, 12) bool (False leads zeroed); padding_mask
        (B, T) bool True = pad; freeze_encoder: run the encoder under no_grad
        (`freeze_finetune_updates`). Returns logits (B, num_classes)."""
        return self.head(
            pooled_output(
                self.encoder, source, lead_mask, padding_mask, self.final_dropout, freeze_encoder
            )
        )


def load_diagnosis_model(path, map_location="cpu") -> tuple[DiagnosisModel, dict]:
    """Rebuild a DiagnosisModel from a "diagnosis" checkpoint (strict load), in eval mode.
    Returns ``(model, checkpoint)``; raises CheckpointError naming the file and the reason."""
    from training.models.checkpoint_file import load_finetuned

    return load_finetuned(
        path,
        "diagnosis",
        "a diagnosis model",
        "head.weight",
        "classification head",
        lambda encoder, n, _: DiagnosisModel(encoder, num_classes=n),
        map_location=map_location,
    )
