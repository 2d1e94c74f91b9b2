"""The wav2vec 2.0 + CMSC ECG model: encoder configs and presets, the encoder, its pretraining
and fine-tuning heads, checkpoint files and the fairseq-signals import.

Builders in the style of torchaudio's wav2vec2 factories::

    build_encoder("paper", dropout=0.0)          # ECGEncoder
    build_pretraining_model("tiny")              # W2VCMSCModel (encoder + quantizer + projections)
    list_presets()                               # ["paper", "small", "tiny"]

Presets and options are documented in ``training.models.encoder_config``.
"""

from __future__ import annotations

import torch

from training.models.checkpoint_file import (
    CheckpointError,
    encoder_state_dict,
    load_checkpoint,
    load_encoder,
    save_checkpoint,
)
from training.models.encoder import ECGEncoder, EncoderOutput
from training.models.encoder_config import PRESET_HELP, PRESETS, EncoderConfig, get_config
from training.models.pretraining import W2VCMSCModel

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ECGEncoder",
    "EncoderConfig",
    "EncoderOutput",
    "W2VCMSCModel",
    "build_encoder",
    "build_pretraining_model",
    "count_parameters",
    "encoder_state_dict",
    "get_config",
    "list_presets",
    "load_checkpoint",
    "load_encoder",
    "preset_summary",
    "save_checkpoint",
]


def list_presets() -> list[str]:
    return list(PRESETS)


def build_encoder(
    preset_or_config: str | EncoderConfig | dict = "paper", **overrides
) -> ECGEncoder:
    """An ECGEncoder from a preset name / EncoderConfig / dict, with EncoderConfig overrides."""
    return ECGEncoder(get_config(preset_or_config, **overrides))


def build_pretraining_model(
    preset_or_config: str | EncoderConfig | dict = "paper", **overrides
) -> W2VCMSCModel:
    """A W2VCMSCModel (encoder + Gumbel quantizer + project_q + final_proj)."""
    return W2VCMSCModel(get_config(preset_or_config, **overrides))


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def preset_summary(name: str) -> dict:
    """Sizes of one preset (built on the meta device: no memory, no init cost)."""
    cfg = get_config(name)
    with torch.device("meta"):
        model = W2VCMSCModel(cfg)
    enc = count_parameters(model.encoder)
    return {
        "name": name,
        "description": PRESET_HELP.get(name, ""),
        "encoder_params": enc,
        "pretraining_head_params": count_parameters(model) - enc,
        "embed_dim": cfg.encoder_embed_dim,
        "layers": cfg.encoder_layers,
        "heads": cfg.encoder_attention_heads,
        "ffn_dim": cfg.encoder_ffn_embed_dim,
        "conv_dim": cfg.conv_dim,
        "final_dim": cfg.final_dim,
    }
