"""ECGEncoder: the wav2vec 2.0 ECG encoder shared by pretraining and fine-tuning.

Forward path (fs/models/wav2vec2/wav2vec2.py:forward / extract_features, HEAD):
  leads zeroed by ``lead_mask`` -> CNN (gradient scaled by ``feature_grad_mult``; no_grad at 0)
  -> features_pen = mean(raw CNN output², fp32) -> (B, T', C) -> LayerNorm(C)
  -> local_features = Dropout(dropout_features)(that)            [quantizer input, "unmasked"]
  -> post_extract_proj (C -> D) -> Dropout(dropout_input)
  -> if mask: frames chosen by compute_mask_indices are replaced by ``mask_emb`` (U(0,1))
  -> padded frames zeroed -> x + posconv(x) -> TransformerEncoder (LN, dropout, layers)
Pooled = mean of the output over non-padded frames.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from training.models.encoder_config import EncoderConfig
from training.models.feature_extractor import ConvFeatureExtractor, GradMultiply
from training.models.lean_ops import Dropout
from training.models.masking import compute_mask_indices
from training.models.positional import ConvPositionalEmbedding
from training.models.transformer import TransformerEncoder


class EncoderOutput(NamedTuple):
    frames: torch.Tensor  # (B, T', D) transformer output
    pooled: torch.Tensor  # (B, D) mean over non-padded frames
    features_pen: torch.Tensor  # () fp32 mean of squared raw CNN features
    local_features: torch.Tensor  # (B, T', C) LayerNorm'ed CNN features after dropout_features
    mask_indices: torch.Tensor | None  # (B, T') bool, True = masked; None when mask=False


class ECGEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.feature_extractor = ConvFeatureExtractor(
            cfg.conv_layers, in_d=cfg.in_d, conv_bias=cfg.conv_bias
        )
        conv_dim = cfg.conv_dim
        self.layer_norm = nn.LayerNorm(conv_dim)
        self.post_extract_proj = (
            nn.Linear(conv_dim, cfg.encoder_embed_dim)
            if conv_dim != cfg.encoder_embed_dim
            else None
        )
        self.dropout_input = Dropout(cfg.dropout_input)
        self.dropout_features = Dropout(cfg.dropout_features)
        self.mask_emb = nn.Parameter(torch.empty(cfg.encoder_embed_dim).uniform_())
        self.pos_conv = ConvPositionalEmbedding(
            cfg.encoder_embed_dim, cfg.conv_pos, cfg.conv_pos_groups
        )
        self.transformer = TransformerEncoder(
            cfg.encoder_embed_dim,
            cfg.encoder_layers,
            cfg.encoder_ffn_embed_dim,
            cfg.encoder_attention_heads,
            dropout=cfg.dropout,
            attention_dropout=cfg.attention_dropout,
            activation_dropout=cfg.activation_dropout,
            layer_norm_eps=cfg.layer_norm_eps,
            layer_norm_first=cfg.layer_norm_first,
            layerdrop=cfg.encoder_layerdrop,
        )
        self.feature_grad_mult = cfg.feature_grad_mult

    @property
    def embed_dim(self) -> int:
        return self.cfg.encoder_embed_dim

    def output_length(self, n_samples: int) -> int:
        """Frames T' for an input of ``n_samples`` samples (156 for 2500)."""
        return self.feature_extractor.output_length(n_samples)

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw CNN output (B, C, T'), with the gradient scaled by ``feature_grad_mult``."""
        if self.feature_grad_mult > 0:
            features = self.feature_extractor(x)
            if self.feature_grad_mult != 1.0:
                features = GradMultiply.apply(features, self.feature_grad_mult)
            return features
        with torch.no_grad():
            return self.feature_extractor(x)

    def frame_padding_mask(
        self, padding_mask: torch.Tensor | None, n_frames: int
    ) -> torch.Tensor | None:
        """Reduce a (B, T) sample padding mask to (B, T') frames: frames beyond the valid length."""
        if padding_mask is None or not padding_mask.any():
            return None
        valid = self.feature_extractor.output_lengths((~padding_mask).sum(-1))
        return torch.arange(n_frames, device=padding_mask.device)[None, :] >= valid[:, None]

    def extract_features(
        self,
        x: torch.Tensor,
        lead_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        mask: bool = False,
        mask_indices: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """x (B, in_d, T) float mV; lead_mask (B, in_d) bool (False leads are zeroed);
        padding_mask (B, T) bool True = pad; mask: apply time masking (pretraining);
        mask_indices: a precomputed (B, T') mask to use instead of drawing one."""
        if x.dim() != 3 or x.shape[1] != self.cfg.in_d:
            raise ValueError(f"expected input (B, {self.cfg.in_d}, T), got {tuple(x.shape)}")
        if lead_mask is not None:
            x = x * lead_mask.to(device=x.device, dtype=x.dtype)[:, :, None]
        features = self.conv_features(x)
        features_pen = features.float().pow(2).mean()  # fp32 under bf16: a sum of squares
        features = self.layer_norm(features.transpose(1, 2))
        local_features = self.dropout_features(features)
        frame_pad = self.frame_padding_mask(padding_mask, features.shape[1])
        h = self.post_extract_proj(features) if self.post_extract_proj is not None else features
        h = self.dropout_input(h)
        if mask or mask_indices is not None:
            if mask_indices is None:
                mask_indices = torch.from_numpy(
                    compute_mask_indices(
                        tuple(h.shape[:2]),
                        frame_pad,
                        self.cfg.mask_prob,
                        self.cfg.mask_length,
                        min_masks=self.cfg.min_masks,
                    )
                )
            mask_indices = mask_indices.to(device=h.device, dtype=torch.bool)
            h = torch.where(mask_indices[..., None], self.mask_emb.to(h.dtype), h)
        if frame_pad is not None:
            h = h.masked_fill(frame_pad[..., None], 0.0)
        h = h + self.pos_conv(h)
        frames = self.transformer(h, frame_pad)
        return EncoderOutput(
            frames, self.pool(frames, frame_pad), features_pen, local_features, mask_indices
        )

    @staticmethod
    def pool(frames: torch.Tensor, frame_pad: torch.Tensor | None) -> torch.Tensor:
        """Mean over time of the non-padded frames: (B, T', D) -> (B, D)."""
        if frame_pad is None:
            return frames.mean(dim=1)
        keep = (~frame_pad).to(frames.dtype)[..., None]
        return (frames * keep).sum(1) / keep.sum(1).clamp_min(1.0)

    def forward(
        self,
        x: torch.Tensor,
        lead_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        mask: bool = False,
    ) -> EncoderOutput:
        return self.extract_features(x, lead_mask=lead_mask, padding_mask=padding_mask, mask=mask)
