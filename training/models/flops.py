"""Analytic FLOP counts of the encoder and the pretraining heads (matmuls and convolutions)."""

from __future__ import annotations

from ecgplat.store import SEGMENT_SAMPLES
from training.models.encoder_config import EncoderConfig


def encoder_forward_flops(cfg: EncoderConfig, n_samples: int = SEGMENT_SAMPLES) -> float:
    """Forward FLOPs (2 x multiply-accumulates) of one segment through the encoder: the conv
    extractor, the projection, the positional conv and the transformer layers."""
    macs, length, c_in = 0, n_samples, cfg.in_d
    for c_out, k, s in cfg.conv_layers:
        length = (length - k) // s + 1
        macs += length * c_out * c_in * k
        c_in = c_out
    t, d, f = length, cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim
    macs += t * c_in * d  # post_extract_proj
    macs += t * d * (d // cfg.conv_pos_groups) * cfg.conv_pos  # positional conv
    macs += cfg.encoder_layers * (t * (4 * d * d + 2 * d * f) + 2 * t * t * d)  # proj, FFN, attn
    return 2.0 * macs


def pretrain_forward_flops(cfg: EncoderConfig, n_samples: int = SEGMENT_SAMPLES) -> float:
    """encoder_forward_flops plus the pretraining heads (final_proj, quantizer, project_q),
    counted on every frame (an upper bound: the heads run on the masked frames)."""
    heads = frames(cfg, n_samples) * (
        cfg.encoder_embed_dim * cfg.final_dim
        + cfg.conv_dim * cfg.latent_vars * cfg.latent_groups
        + cfg.vq_dim * cfg.final_dim
    )
    return encoder_forward_flops(cfg, n_samples) + 2.0 * heads


def frames(cfg: EncoderConfig, n_samples: int = SEGMENT_SAMPLES) -> int:
    """Frames the conv extractor makes of `n_samples` samples (156 for 5 s at 500 Hz)."""
    t = n_samples
    for _, k, s in cfg.conv_layers:
        t = (t - k) // s + 1
    return t


def inference_batch_size(
    cfg: EncoderConfig, target_gflop: float = 20.0, min_rows: int = 4096, cap: int = 512
) -> int:
    """Segments per inference batch, sized to the model: at least `min_rows` frames per GEMM
    (B x T rows keep the matmul kernels efficient) and at least `target_gflop` of work per
    batch (so a small model's per-batch costs, the store read and Python, stay small next to
    it); a multiple of 16, at most `cap`. The paper encoder gets 32, the tiny one 304."""
    by_rows = -(-min_rows // frames(cfg))
    by_work = int(-(-target_gflop * 1e9 // encoder_forward_flops(cfg)))
    return max(16, min(cap, -(-max(by_rows, by_work) // 16) * 16))
