"""Convolutional relative positional embedding (fs/modules/conv_positional_encoding.py).

Conv1d(D -> D, kernel 128, padding 64, 16 groups) with weight normalisation over dim 2 (one
magnitude per kernel position, `torch.nn.utils.parametrizations.weight_norm`), then SamePad (drop
the last frame, because an even kernel with padding k/2 yields T + 1 frames), then GELU. The
caller adds the result to its input: x <- x + posconv(x).
Init: weight N(0, sqrt(4 / (k * D))) before the weight norm, bias 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class ConvPositionalEmbedding(nn.Module):
    def __init__(self, embed_dim: int, kernel_size: int = 128, groups: int = 16):
        super().__init__()
        conv = nn.Conv1d(embed_dim, embed_dim, kernel_size, padding=kernel_size // 2, groups=groups)
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 / (kernel_size * embed_dim)))
        nn.init.constant_(conv.bias, 0.0)
        self.conv = weight_norm(conv, name="weight", dim=2)
        self.trim = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D): the positional term only (not yet added)."""
        y = self.conv(x.transpose(1, 2))
        if self.trim:
            y = y[:, :, : -self.trim]
        return F.gelu(y).transpose(1, 2)
