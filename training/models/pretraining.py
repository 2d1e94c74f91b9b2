"""W2VCMSCModel: the pretraining model (fairseq-signals `wav2vec2_cmsc`) = encoder + heads.

One masked forward pass over the whole batch (both segments of every CMSC pair) produces:
  frames    (B, T', D)        masked-pass transformer output (the objective mean-pools it for CMSC)
  pooled    (B, D)            its mean over non-padded frames
  x         (B, M, final_dim) final_proj(frames at the M masked positions per row)  [context c]
  y         (B, M, final_dim) project_q(quantize(local_features at the same positions)) [targets q]
  features_pen, prob_perplexity, code_perplexity (scalars), num_vars (G*V), temp (float),
  mask_indices (B, T') bool
The InfoNCE negatives, diversity/feature-penalty weighting and the CMSC loss live in the
objective; ``set_num_updates`` drives the Gumbel temperature. ``remove_pretraining_modules``
drops the heads (as fairseq before fine-tuning).
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.encoder import ECGEncoder
from training.models.encoder_config import EncoderConfig
from training.models.quantizer import GumbelVectorQuantizer


class W2VCMSCModel(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ECGEncoder(cfg)
        self.quantizer = GumbelVectorQuantizer(
            cfg.conv_dim, cfg.latent_vars, cfg.latent_groups, cfg.vq_dim, cfg.latent_temp
        )
        self.project_q = nn.Linear(cfg.vq_dim, cfg.final_dim)
        self.final_proj = nn.Linear(cfg.encoder_embed_dim, cfg.final_dim)
        self.num_updates = 0

    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates = num_updates
        if self.quantizer is not None:
            self.quantizer.set_num_updates(num_updates)

    def remove_pretraining_modules(self) -> None:
        self.quantizer = None
        self.project_q = None
        self.final_proj = None

    def forward(
        self,
        source: torch.Tensor,
        lead_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        mask_indices: torch.Tensor | None = None,
    ) -> dict:
        """source (B, in_d, T) mV -> the dict described in the module docstring.
        ``mask_indices`` (B, T') may be given to fix the masked frames (tests, debugging)."""
        if self.quantizer is None:
            raise RuntimeError("pretraining heads were removed; use model.encoder for features")
        out = self.encoder.extract_features(
            source,
            lead_mask=lead_mask,
            padding_mask=padding_mask,
            mask=True,
            mask_indices=mask_indices,
        )
        mi = out.mask_indices
        bsz = source.shape[0]
        # every row masks the same number M of frames, so the gathers reshape to (B, M, C)
        y = out.local_features[mi].view(bsz, -1, out.local_features.shape[-1])
        q = self.quantizer(y)
        x = self.final_proj(out.frames[mi].view(bsz, -1, out.frames.shape[-1]))
        return {
            "frames": out.frames,
            "pooled": out.pooled,
            "x": x,
            "y": self.project_q(q["x"]),
            "features_pen": out.features_pen,
            "prob_perplexity": q["prob_perplexity"],
            "code_perplexity": q["code_perplexity"],
            "num_vars": q["num_vars"],
            "temp": q["temp"],
            "mask_indices": mi,
        }
