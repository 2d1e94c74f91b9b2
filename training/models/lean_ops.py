"""Memory-lean versions of dropout, attention and the FFN's GELU -> Linear.

Same mathematics as the plain torch ops, fewer saved activations (the 2-core / 24 GiB budget):
  * ``Dropout``: on CPU torch's dropout keeps a *float* noise tensor for backward; this one keeps
    a bool mask (1 byte per element). On CUDA torch's fused kernel already does, so it is used.
  * ``attention``: SDPA (flash / memory-efficient kernels) whenever it can; on CPU with attention
    dropout SDPA falls back to its math path, which keeps the probabilities, a float dropout
    mask and the dropped probabilities (B, H, T, T) each; the path here keeps q, k, v and a bool
    mask and recomputes the probabilities in backward.
  * ``gelu_dropout_linear``: fc2(dropout(gelu(h))) that saves only ``h`` (already kept by fc1)
    and the dropout mask, recomputing the GELU in backward, instead of keeping the (B, T, FFN)
    activation: ~31 MB per layer per 16 segments for the paper model, at the cost of one GELU.
  * ``LayerNorm``: saves its output (which the next Linear keeps anyway) instead of its input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Bool mask, True with probability 1 - p (rand >= p: faster than a bool bernoulli_ on CPU)."""
    return torch.rand_like(x) >= p


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    return x.masked_fill(~_keep_mask(x, p), 0.0).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """nn.Dropout with a bool mask on CPU (see module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class _DropoutAttention(torch.autograd.Function):
    """Attention with dropout that saves q, k, v and a bool mask only; the probabilities are
    recomputed in backward (two small (T x T) matmuls per head, ~4 % of a layer's FLOPs)."""

    @staticmethod
    def _probs(q, k, attn_mask):
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        return torch.softmax(_at_least_fp32(scores), dim=-1).to(q.dtype)

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, p):
        probs = _DropoutAttention._probs(q, k, attn_mask)
        keep = _keep_mask(probs, p)
        ctx.p = p
        ctx.save_for_backward(q, k, v, attn_mask, keep)
        return torch.matmul(probs.masked_fill_(~keep, 0.0).mul_(1.0 / (1.0 - p)), v)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, attn_mask, keep = ctx.saved_tensors
        scale = 1.0 / (1.0 - ctx.p)
        probs = _DropoutAttention._probs(q, k, attn_mask)
        dropped = probs.masked_fill(~keep, 0.0).mul_(scale)
        grad_v = torch.matmul(dropped.transpose(-2, -1), grad_out)
        del dropped
        grad_p = torch.matmul(grad_out, v.transpose(-2, -1)).masked_fill_(~keep, 0.0).mul_(scale)
        # softmax backward: dS = P * (dP - sum(dP * P))
        grad_s = probs * (grad_p - (grad_p * probs).sum(-1, keepdim=True))
        grad_s.mul_(1.0 / math.sqrt(q.shape[-1]))
        return torch.matmul(grad_s, k), torch.matmul(grad_s.transpose(-2, -1), q), grad_v, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
              dropout_p: float) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d) [masked]) v with dropout on the probabilities.
    q, k, v (B, H, T, d); attn_mask broadcastable to (B, H, T, T), bool, True = may attend."""
    if dropout_p == 0.0 or dropout_p >= 1.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return _DropoutAttention.apply(q, k, v, attn_mask, dropout_p)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _GeluDropoutLinear(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h, weight, bias, p):
        keep = _keep_mask(h, p) if p > 0.0 else None
        a = F.gelu(_at_least_fp32(h)).to(h.dtype)
        if keep is not None:
            a = a.masked_fill_(~keep, 0.0).mul_(1.0 / (1.0 - p))
        ctx.p = p
        ctx.has_bias = bias is not None
        ctx.save_for_backward(h, weight, keep)
        return F.linear(a, weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        h, weight, keep = ctx.saved_tensors
        hf = _at_least_fp32(h)
        a = F.gelu(hf).to(h.dtype)
        if keep is not None:
            a = a.masked_fill_(~keep, 0.0).mul_(1.0 / (1.0 - ctx.p))
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = (g2.t() @ a.reshape(-1, a.shape[-1]).to(g2.dtype)).to(weight.dtype)
        grad_b = g2.sum(0).to(weight.dtype) if ctx.has_bias else None
        grad_a = torch.matmul(grad_out, weight.to(grad_out.dtype))
        if keep is not None:
            grad_a = grad_a.masked_fill_(~keep, 0.0).mul_(1.0 / (1.0 - ctx.p))
        grad_h = torch.ops.aten.gelu_backward(_at_least_fp32(grad_a), hf).to(h.dtype)
        return grad_h, grad_w, grad_b, None


def gelu_dropout_linear(h: torch.Tensor, linear: nn.Linear, p: float, training: bool) -> torch.Tensor:
    """linear(dropout(gelu(h), p)) with GELU in fp32 (fairseq's utils.gelu), recomputed in backward."""
    p = p if training else 0.0
    if not torch.is_grad_enabled() or not (h.requires_grad or linear.weight.requires_grad):
        a = F.gelu(_at_least_fp32(h)).to(h.dtype)
        return linear(dropout(a, p, p > 0.0))
    return _GeluDropoutLinear.apply(h, linear.weight, linear.bias, p)


class _LayerNormFromOutput(torch.autograd.Function):
    """LayerNorm whose backward rebuilds x̂ = (y - β) / γ from its output instead of keeping the
    input: in post-LN layers y is kept anyway by the next Linear, so the input's copy is saved."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, _, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)
        ctx.save_for_backward(y, weight, bias, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        y, weight, bias, rstd = ctx.saved_tensors
        x_hat = (y - bias) / weight
        dims = tuple(range(grad_y.dim() - 1))
        grad_w = (grad_y * x_hat).sum(dims)
        grad_b = grad_y.sum(dims)
        gh = grad_y * weight
        grad_x = rstd * (gh - gh.mean(-1, keepdim=True) - x_hat * (gh * x_hat).mean(-1, keepdim=True))
        return grad_x, grad_w, grad_b, None


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state dict) that, on CPU in training, saves its output
    rather than its input (see _LayerNormFromOutput). Falls back to the plain op when an
    affine weight is so small that dividing by it would lose precision."""

    min_abs_weight = 1e-3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or not torch.is_grad_enabled() or x.dtype != self.weight.dtype
                or not self.elementwise_affine or self.bias is None
                or bool((self.weight.detach().abs() < self.min_abs_weight).any())):
            return super().forward(x)
        return _LayerNormFromOutput.apply(x, self.weight, self.bias, self.eps)
