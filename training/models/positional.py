"""Convolutional relative positional embedding (fs/modules/conv_positional_encoding.py).

Conv1d(D -> D, kernel 128, padding 64, 16 groups) with weight normalisation over dim 2 (one
magnitude per kernel position, `torch.nn.utils.parametrizations.weight_norm`), then SamePad (drop
the last frame, because an even kernel with padding k/2 yields T + 1 frames), then GELU. The
caller adds the result to its input: x <- x + posconv(x).
Init: weight N(0, sqrt(4 / (k * D))) before the weight norm, bias 0.

On CPU in training the convolution runs through ``grouped_conv1d`` (same result, faster
backward; see there). The dropped last frame is never computed: the input is padded (k/2,
k/2 - 1) instead of (k/2, k/2), which yields exactly the T frames SamePad keeps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from training.models.lean_ops import compute_dtype, no_autocast, sum_at_least_fp32


class _GroupedConv1d(torch.autograd.Function):
    """F.conv1d(x, w, b, groups=g) (no padding, stride 1) whose input gradient is computed as a
    *forward* convolution of the output gradient with the flipped, group-transposed kernel.

    Why: for the positional conv's shape (768 -> 768, k 128, 16 groups) oneDNN's backward-data
    kernel takes ~2x the time of its forward kernel on AVX2 CPUs, while the equivalent forward
    convolution is as fast as the forward pass (~1.0 -> ~0.5 CPU-s per 16 segments). The weight
    gradient still comes from aten's convolution_backward (weight only). Under autocast it
    computes in the autocast dtype, cast at the boundary (see lean_ops)."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups):
        dtype = compute_dtype(x)
        ctx.in_dtypes = (x.dtype, weight.dtype)
        x, weight = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.groups = groups
        ctx.has_bias = bias is not None
        with no_autocast(x):
            return F.conv1d(x, weight, None if bias is None else bias.to(dtype), groups=groups)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        with no_autocast(x):
            grads = _grouped_conv1d_backward(ctx, grad_y.to(x.dtype).contiguous(), x, weight)
        grad_x, grad_w, grad_b = grads
        x_dtype, w_dtype = ctx.in_dtypes
        return (
            None if grad_x is None else grad_x.to(x_dtype),
            None if grad_w is None else grad_w.to(w_dtype),
            None if grad_b is None else grad_b.to(w_dtype),
            None,
        )


def _grouped_conv1d_backward(ctx, grad_y, x, weight):
    """Gradients (x, weight, bias) of _GroupedConv1d in the saved tensors' dtype."""
    groups = ctx.groups
    grad_x = grad_w = grad_b = None
    c_out, c_in_g, k = weight.shape
    if ctx.needs_input_grad[0]:
        # full correlation: grad_x[s] = sum_j grad_y[s - j] W[:, :, j]
        w_t = (
            weight.view(groups, c_out // groups, c_in_g, k)
            .transpose(1, 2)
            .reshape(groups * c_in_g, c_out // groups, k)
            .flip(2)
        )
        grad_x = F.conv1d(F.pad(grad_y, (k - 1, k - 1)), w_t, groups=groups)
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.aten.convolution_backward(
            grad_y, x, weight, None, [1], [0], [1], False, [0], groups, [False, True, False]
        )[1]
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = sum_at_least_fp32(grad_y, (0, 2))
    return grad_x, grad_w, grad_b


def grouped_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int
) -> torch.Tensor:
    """Grouped Conv1d, stride 1, no padding; custom backward on CPU (see _GroupedConv1d)."""
    if x.device.type != "cpu" or not torch.is_grad_enabled():
        return F.conv1d(x, weight, bias, groups=groups)
    return _GroupedConv1d.apply(x, weight, bias, groups)


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
        conv = self.conv
        pad = conv.padding[0]
        xp = F.pad(x.transpose(1, 2), (pad, pad - self.trim))
        y = grouped_conv1d(xp, conv.weight, conv.bias, conv.groups)
        return F.gelu(y).transpose(1, 2)
