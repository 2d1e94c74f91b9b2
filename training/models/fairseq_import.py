"""Import fairseq-signals wav2vec 2.0 (+CMSC) pretraining checkpoints.

``map_fairseq_state_dict`` is a pure function: fairseq state dict + its ``cfg["model"]`` ->
(EncoderConfig, our state dict for W2VCMSCModel). Every source key must be known and every
target weight must be produced with the right shape; otherwise it raises ValueError naming the
keys. Key families (source -> ours):

    feature_extractor.conv_layers.*          -> encoder.feature_extractor.conv_layers.*
    layer_norm.* / post_extract_proj.* / mask_emb -> encoder.<same>
    conv_pos.pos_conv.0.*  (HEAD; posconv in the model)           -> encoder.pos_conv.conv.*
    encoder.pos_conv.0.*   (PAPER-ERA / wav2vec2; posconv in the encoder)
        weight_g | parametrizations.weight.original0 -> parametrizations.weight.original0
        weight_v | parametrizations.weight.original1 -> parametrizations.weight.original1
    encoder.layer_norm.* / encoder.layers.N.*     -> encoder.transformer.<same>
    quantizer.{vars,weight_proj.*}, project_q.*, final_proj.*     -> unchanged

LayerNorm eps is not in fairseq's config: PAPER-ERA models (registered as `wav2vec2_clocs`)
used 1e-6 in the encoder layers, HEAD 1e-5; pass ``layer_norm_eps`` to force one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from training.models.checkpoint_file import load_failure, save_checkpoint
from training.models.encoder_config import EncoderConfig

PAPER_ERA_NAMES = {"wav2vec2_clocs"}

# fairseq options that select code paths we do not implement, with the value we require
_REQUIRED = {
    "quantize_targets": True,
    "quantize_input": False,
    "same_quantizer": False,
    "target_glu": False,
    "extractor_mode": "default",
    "mask_selection": "static",
    "no_mask_overlap": False,
    "mask_channel_prob": 0.0,
    "negatives_from_everywhere": False,
    "codebook_negatives": 0,
    "cross_sample_negatives": 0,
}

_RULES = [
    (
        r"feature_extractor\.conv_layers\.(\d+)\.(\d+)\.(weight|bias)",
        r"encoder.feature_extractor.conv_layers.\1.\2.\3",
    ),
    (r"layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"encoder.post_extract_proj.\1"),
    (r"mask_emb", r"encoder.mask_emb"),
    (r"(?:conv_pos|encoder)\.pos_conv\.0\.bias", r"encoder.pos_conv.conv.bias"),
    (
        r"(?:conv_pos|encoder)\.pos_conv\.0\.(?:weight_g|parametrizations\.weight\.original0)",
        r"encoder.pos_conv.conv.parametrizations.weight.original0",
    ),
    (
        r"(?:conv_pos|encoder)\.pos_conv\.0\.(?:weight_v|parametrizations\.weight\.original1)",
        r"encoder.pos_conv.conv.parametrizations.weight.original1",
    ),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.transformer.layer_norm.\1"),
    (
        (
            r"encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|self_attn_layer_norm|fc1|fc2|final_layer_norm)"
            r"\.(weight|bias)"
        ),
        r"encoder.transformer.layers.\1.\2.\3",
    ),
    (r"quantizer\.vars", r"quantizer.vars"),
    (r"quantizer\.weight_proj\.(weight|bias)", r"quantizer.weight_proj.\1"),
    (r"(project_q|final_proj)\.(weight|bias)", r"\1.\2"),
]
_RULES = [(re.compile(src + r"\Z"), dst) for src, dst in _RULES]
_IGNORED = re.compile(r"(.*\.)?(version|_float_tensor)\Z")


def _map_key(key: str) -> str | None:
    for pattern, dst in _RULES:
        if pattern.match(key):
            return pattern.sub(dst, key)
    return None


def config_from_fairseq(model_cfg: dict, layer_norm_eps: float | None = None) -> EncoderConfig:
    """EncoderConfig from a fairseq-signals ``cfg["model"]`` dict (options matched by name)."""
    if not isinstance(model_cfg, dict):
        raise TypeError(f"fairseq model config must be a dict, got {type(model_cfg).__name__}")
    for opt, want in _REQUIRED.items():
        if opt in model_cfg and model_cfg[opt] is not None and model_cfg[opt] != want:
            raise ValueError(
                f"fairseq option {opt}={model_cfg[opt]!r} is not supported (need {want!r})"
            )
    names = {f.name for f in dataclasses.fields(EncoderConfig)}
    fields = {k: v for k, v in model_cfg.items() if k in names and v is not None}
    if "latent_temp" in fields:
        fields["latent_temp"] = tuple(float(t) for t in fields["latent_temp"])
    if layer_norm_eps is None:
        layer_norm_eps = 1e-6 if model_cfg.get("_name") in PAPER_ERA_NAMES else 1e-5
    fields["layer_norm_eps"] = float(layer_norm_eps)
    return EncoderConfig(**fields)


def map_fairseq_state_dict(
    state_dict: dict, model_cfg: dict, layer_norm_eps: float | None = None
) -> tuple[EncoderConfig, dict]:
    """Map a fairseq-signals wav2vec2(_cmsc) state dict onto W2VCMSCModel's keys (see module doc).

    Raises ValueError naming unknown source keys, missing target keys and shape mismatches.
    """
    from training.models.pretraining import W2VCMSCModel

    cfg = config_from_fairseq(model_cfg, layer_norm_eps)
    mapped, unknown = {}, []
    for key, value in state_dict.items():
        target = _map_key(key)
        if target is None:
            if not _IGNORED.match(key):
                unknown.append(key)
            continue
        if target in mapped:
            raise ValueError(
                f"fairseq keys map twice onto {target} (both weight-norm layouts present?)"
            )
        mapped[target] = value
    if unknown:
        raise ValueError(f"unknown fairseq-signals key(s): {', '.join(sorted(unknown))}")

    with torch.device("meta"):
        expected = {k: v.shape for k, v in W2VCMSCModel(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise ValueError(
            f"missing weight(s) in the fairseq-signals state dict for: {', '.join(missing)}"
        )
    bad = [
        f"{k} {tuple(mapped[k].shape)} != {tuple(expected[k])}"
        for k in expected
        if tuple(mapped[k].shape) != tuple(expected[k])
    ]
    if bad:
        raise ValueError(f"shape mismatch against the config: {'; '.join(bad)}")
    return cfg, {k: mapped[k].detach().clone().float() for k in expected}


def _json_safe(obj):
    return json.loads(json.dumps(obj, default=str))


def import_fairseq_checkpoint(
    src: str | os.PathLike, out: str | os.PathLike, layer_norm_eps: float | None = None
) -> Path:
    """Convert a fairseq-signals pretraining checkpoint into an ecgplat checkpoint of kind
    "imported" (encoder + quantizer/project_q/final_proj heads). Errors name ``src``."""
    src = Path(src)
    if not src.is_file():
        raise ValueError(f"{src}: no such file")
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for non-checkpoint files
        raise ValueError(f"{src}: not a loadable torch checkpoint ({load_failure(e)})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{src}: not a fairseq checkpoint (no 'model' state dict)")
    cfg_all = ckpt.get("cfg")
    if not isinstance(cfg_all, dict) or not isinstance(cfg_all.get("model"), dict):
        raise ValueError(  # noqa: TRY004 - bad file content, reported like every other input error
            f"{src}: no cfg['model'] (only hydra-era fairseq-signals checkpoints are supported)"
        )
    model_cfg = cfg_all["model"]
    try:
        cfg, state = map_fairseq_state_dict(ckpt["model"], model_cfg, layer_norm_eps)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    return save_checkpoint(
        out,
        kind="imported",
        encoder_config=cfg,
        model=state,
        config={"source": "fairseq-signals", "fairseq_model_cfg": _json_safe(model_cfg)},
        num_updates=int((ckpt.get("optimizer_history") or [{}])[-1].get("num_updates", 0) or 0),
        extra={"imported_from": src.name},
    )
