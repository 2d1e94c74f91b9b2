"""The convolutional feature extractor (fs/modules/conv_feature_extraction.py, mode "default").

Four Conv1d(kernel 2, stride 2, no bias) blocks turn (B, 12, 2500) millivolts into
(B, 256, 156) frames (stride 16 samples = 32 ms). Block 0 is Conv -> Dropout -> GroupNorm(C, C)
(per-channel normalisation over time, computed in fp32) -> GELU; the others Conv -> Dropout ->
GELU. Module indices inside each block match fairseq's (`conv_layers.0.2` is the GroupNorm) so
checkpoints map one to one. Also here: `GradMultiply`, which scales the gradient flowing into the
CNN (`feature_grad_mult`) without changing the forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.models.lean_ops import Dropout


class GradMultiply(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the autocast dtype (fairseq's Fp32GroupNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.group_norm(
            x.float(),
            self.num_groups,
            self.weight.float() if self.weight is not None else None,
            self.bias.float() if self.bias is not None else None,
            self.eps,
        )
        return out.type_as(x)


class ConvFeatureExtractor(nn.Module):
    """Stack of strided Conv1d blocks; ``conv_layers`` is a list of (channels, kernel, stride)."""

    def __init__(
        self,
        conv_layers: list[tuple[int, int, int]],
        in_d: int = 12,
        dropout: float = 0.0,
        conv_bias: bool = False,
    ):
        super().__init__()
        self.spec = list(conv_layers)
        blocks = []
        in_ch = in_d
        for i, (dim, kernel, stride) in enumerate(self.spec):
            conv = nn.Conv1d(in_ch, dim, kernel, stride=stride, bias=conv_bias)
            nn.init.kaiming_normal_(conv.weight)
            if i == 0:
                block = nn.Sequential(
                    conv, Dropout(dropout), Fp32GroupNorm(dim, dim, affine=True), nn.GELU()
                )
            else:
                block = nn.Sequential(conv, Dropout(dropout), nn.GELU())
            blocks.append(block)
            in_ch = dim
        self.conv_layers = nn.ModuleList(blocks)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames produced from ``lengths`` samples (no padding: L -> floor((L - k) / s) + 1)."""
        for _, kernel, stride in self.spec:
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths

    def output_length(self, n_samples: int) -> int:
        return int(self.output_lengths(torch.tensor([n_samples]))[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_d, T) -> (B, C, T')."""
        for block in self.conv_layers:
            x = block(x)
        return x
