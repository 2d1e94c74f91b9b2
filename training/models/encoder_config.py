"""EncoderConfig: every option of the wav2vec 2.0 + CMSC model, and the named presets.

Field names mirror the fairseq-signals options of `wav2vec2_cmsc` (fs/models/wav2vec2/wav2vec2.py,
fs/models/ecg_transformer.py), so a fairseq-signals `cfg["model"]` maps onto this dataclass by
name. Defaults are those of the paper's pretraining config `w2v_cmsc_rlm.yaml` (HEAD), except
`layer_norm_eps`, which fairseq does not expose: 1e-5 is HEAD, 1e-6 the PAPER-ERA encoder layers
(the two versions of the original: docs/method.md).

Presets:
  * ``paper``: the paper's encoder (768 wide, 12 post-LN layers, 12 heads, FFN 3072,
    final_dim 256): ~90.37 M encoder parameters + ~0.51 M pretraining heads.
  * ``small``: the original's `w2v_cmsc_rlm_small.yaml`: the paper model with 8 layers.
  * ``tiny``: for tests and the CPU demo. The conv extractor keeps the paper's layout (4 x
    kernel 2 / stride 2, so T' = 156 for 2500 samples) but with 48 channels instead of 256:
    with 256 (or 128) channels the CNN is most of a tiny model's cost (conv cost grows with
    channels²); 48 still differs from the width, so post_extract_proj exists as in the paper
    model. Transformer width 64, 2 layers, 4 heads, FFN 256, final_dim 32. Its
    ``local_features`` have 48 channels: use ``EncoderConfig.conv_dim``, not a literal 256.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass


@dataclass
class EncoderConfig:
    # --- input and CNN feature extractor (fs/modules/conv_feature_extraction.py)
    in_d: int = 12
    """`in_d`: input channels (leads); absent leads are zero rows, never fewer channels."""
    conv_feature_layers: str = "[(256, 2, 2)] * 4"
    """`conv_feature_layers`: (channels, kernel, stride) conv blocks as a Python expression."""
    conv_bias: bool = False
    """`conv_bias`: bias in the extractor convolutions."""
    extractor_mode: str = "default"
    """`extractor_mode`: "default" = GroupNorm(C, C) after the first conv only (the one mode)."""
    feature_grad_mult: float = 0.1
    """`feature_grad_mult`: gradient scale into the CNN; 0 runs the CNN under no_grad (frozen)."""

    # --- transformer (fs/modules/transformer_encoder{,_layer}.py)
    encoder_embed_dim: int = 768
    """`encoder_embed_dim`: transformer width D."""
    encoder_layers: int = 12
    """`encoder_layers`: number of transformer layers."""
    encoder_attention_heads: int = 12
    """`encoder_attention_heads`: attention heads per layer."""
    encoder_ffn_embed_dim: int = 3072
    """`encoder_ffn_embed_dim`: hidden width of the feed-forward block."""
    layer_norm_first: bool = False
    """`layer_norm_first`: pre-LN layers if True; the paper uses post-LN (False)."""
    layer_norm_eps: float = 1e-5
    """not a fairseq option: eps of the encoder-layer LayerNorms (1e-5 HEAD, 1e-6 PAPER-ERA)."""
    conv_pos: int = 128
    """`conv_pos`: kernel size of the convolutional positional embedding."""
    conv_pos_groups: int = 16
    """`conv_pos_groups`: groups of the positional convolution."""

    # --- dropouts (fine-tuning overrides them)
    dropout: float = 0.1
    """`dropout`: dropout after attention/FFN outputs and after the encoder's input LayerNorm."""
    attention_dropout: float = 0.1
    """`attention_dropout`: dropout on the attention probabilities."""
    activation_dropout: float = 0.0
    """`activation_dropout`: dropout after the FFN activation."""
    dropout_input: float = 0.1
    """`dropout_input`: dropout after post_extract_proj (the transformer branch)."""
    dropout_features: float = 0.1
    """`dropout_features`: dropout on the unmasked LayerNorm'ed conv features (quantizer input)."""
    encoder_layerdrop: float = 0.0
    """`encoder_layerdrop`: probability of skipping a whole layer in training."""

    # --- time masking (fs/data/data_utils.py:compute_mask_indices)
    mask_prob: float = 0.65
    """`mask_prob`: expected fraction of frames that start a span, times mask_length."""
    mask_length: int = 10
    """`mask_length`: span length in frames."""
    mask_selection: str = "static"
    """`mask_selection`: only "static" (fixed span length) is implemented."""
    min_masks: int = 2
    """`min_masks` argument of compute_mask_indices as wav2vec2.apply_mask passes it."""

    # --- pretraining heads (quantizer, projections) and loss options read by the objective
    final_dim: int = 256
    """`final_dim`: dimension of final_proj / project_q outputs (the contrastive space)."""
    latent_vars: int = 320
    """`latent_vars`: codewords per quantizer group."""
    latent_groups: int = 2
    """`latent_groups`: quantizer groups."""
    latent_dim: int = 0
    """`latent_dim`: quantized vector size; 0 means final_dim."""
    latent_temp: tuple[float, float, float] = (2.0, 0.5, 0.999995)
    """`latent_temp`: Gumbel temperature (start, end, decay per update)."""
    logit_temp: float = 0.1
    """`logit_temp`: temperature of the InfoNCE cosine logits (used by the objective)."""
    num_negatives: int = 100
    """`num_negatives`: distractors per masked frame (used by the objective)."""

    def __post_init__(self) -> None:
        self.latent_temp = tuple(float(t) for t in self.latent_temp)
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError(
                f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                f"encoder_attention_heads {self.encoder_attention_heads}"
            )
        if self.encoder_embed_dim % self.conv_pos_groups:
            raise ValueError(
                f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                f"conv_pos_groups {self.conv_pos_groups}"
            )
        if self.extractor_mode != "default":
            raise ValueError(
                f"extractor_mode {self.extractor_mode!r} is not supported (only 'default')"
            )
        if self.mask_selection != "static":
            raise ValueError(
                f"mask_selection {self.mask_selection!r} is not supported (only 'static')"
            )
        if self.vq_dim % self.latent_groups:
            raise ValueError(
                f"quantized dim {self.vq_dim} is not divisible by latent_groups "
                f"{self.latent_groups}"
            )
        parse_conv_layers(self.conv_feature_layers)

    @property
    def conv_layers(self) -> list[tuple[int, int, int]]:
        return parse_conv_layers(self.conv_feature_layers)

    @property
    def conv_dim(self) -> int:
        """Channels of the CNN output = width of ``local_features`` and the quantizer input."""
        return self.conv_layers[-1][0]

    @property
    def vq_dim(self) -> int:
        return self.latent_dim if self.latent_dim > 0 else self.final_dim

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["latent_temp"] = list(self.latent_temp)
        return d

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> EncoderConfig:
        """Rebuild from ``to_dict()`` output; unknown keys are an error (stale/foreign config)."""
        merged = {**d, **overrides}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - names)
        if unknown:
            raise ValueError(f"unknown EncoderConfig option(s): {', '.join(unknown)}")
        return cls(**merged)

    def replace(self, **overrides) -> EncoderConfig:
        return EncoderConfig.from_dict(self.to_dict(), **overrides)


def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """Evaluate a fairseq `conv_feature_layers` string such as "[(256, 2, 2)] * 4" safely.

    Only list/tuple literals of integers combined with ``+`` and ``*`` are accepted.
    """

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"conv_feature_layers {spec!r}: unsupported expression")

    try:
        layers = ev(ast.parse(spec, mode="eval"))
    except SyntaxError as e:
        raise ValueError(f"conv_feature_layers {spec!r}: {e.msg}") from None
    if (
        not isinstance(layers, list)
        or not layers
        or not all(
            isinstance(t, tuple) and len(t) == 3 and all(isinstance(v, int) and v > 0 for v in t)
            for t in layers
        )
    ):
        raise ValueError(
            f"conv_feature_layers {spec!r}: expected a non-empty list of "
            "(channels, kernel, stride) tuples of positive ints"
        )
    return layers


PRESETS: dict[str, EncoderConfig] = {
    "paper": EncoderConfig(),
    "small": EncoderConfig(encoder_layers=8),
    "tiny": EncoderConfig(
        conv_feature_layers="[(48, 2, 2)] * 4",
        encoder_embed_dim=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_embed_dim=256,
        final_dim=32,
    ),
}

PRESET_HELP: dict[str, str] = {
    "paper": "the paper's encoder: 768 wide, 12 post-LN layers, 12 heads, FFN 3072",
    "small": "the original's small config: the paper encoder with 8 layers",
    "tiny": "tests and CPU demo: 48-channel CNN, 64 wide, 2 layers, 4 heads, FFN 256",
}


def get_config(preset_or_config: str | EncoderConfig | dict, **overrides) -> EncoderConfig:
    """A fresh EncoderConfig from a preset name, a config or a dict, with field overrides."""
    if isinstance(preset_or_config, EncoderConfig):
        base = preset_or_config.to_dict()
    elif isinstance(preset_or_config, dict):
        base = dict(preset_or_config)
    elif isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(
                f"unknown model preset {preset_or_config!r}; choose one of {', '.join(PRESETS)}"
            )
        base = PRESETS[preset_or_config].to_dict()
    else:
        raise TypeError(
            f"expected a preset name, EncoderConfig or dict, got {type(preset_or_config).__name__}"
        )
    return EncoderConfig.from_dict(base, **overrides)
