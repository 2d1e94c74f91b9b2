"""Memory-lean versions of dropout, attention and the FFN's GELU -> Linear.

Same mathematics as the plain torch ops, fewer saved activations (the 2-core / 24 GiB budget):
  * ``Dropout``: on CPU torch's dropout keeps a *float* noise tensor for backward; this one keeps
    a bool mask (1 byte per element). On CUDA torch's fused kernel already does, so it is used.
  * ``attention`` / ``packed_attention``: SDPA (flash / memory-efficient kernels) whenever it
    can; on CPU with attention dropout SDPA falls back to its math path, which keeps the
    probabilities, a float dropout mask and the dropped probabilities (B, H, T, T) each; the
    path here keeps q, k, v and a bool mask, recomputes the probabilities in backward and uses
    aten's fused softmax backward. ``packed_attention`` takes the fused q/k/v projection.
  * ``qkv_linear``: the q, k, v projections as one GEMM (x read once, wider N) without keeping
    the concatenated weight alive for backward (it is rebuilt there: 3 D² floats per layer).
  * ``gelu_dropout_linear``: fc2(dropout(gelu(h))) that saves only ``h`` (already kept by fc1)
    and the dropout mask, recomputing the GELU in backward, instead of keeping the (B, T, FFN)
    activation: ~31 MB per layer per 16 segments for the paper model, at the cost of one GELU.
  * ``LayerNorm``: saves its output (which the next Linear keeps anyway) instead of its input.

Autocast (CPU and CUDA, bf16 or fp16): each autograd Function casts at its boundary. Its forward
picks the compute dtype (the autocast dtype when autocast is on for the input's device, else the
input's dtype), casts the floating inputs to it and runs with autocast off; backward runs in that
same dtype and returns each gradient in its input's dtype. Softmax and GELU run on the
reduced-precision tensors: aten computes them in fp32 inside and rounds once (no fp32 copies).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op on ``x`` computes in: autocast's when it is on for x's device."""
    kind = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def no_autocast(x: torch.Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


def _keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Bool mask, True with probability 1 - p (rand >= p: faster than a bool bernoulli_ on CPU).
    Drawn in fp32 whatever x's dtype: a bf16 run drops what an fp32 run from the same RNG state
    drops."""
    return torch.rand(x.shape, device=x.device) >= p


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    # where(drop, 0, x * s): two passes (masked_fill + mul_ would copy, fill, then scale)
    return torch.where(_drop_mask(x, p), 0.0, x * (1.0 / (1.0 - p)))


class Dropout(nn.Dropout):
    """nn.Dropout with a bool mask on CPU (see module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def _drop_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Bool mask, True = dropped: exactly ``~_keep_mask(x, p)`` for the same RNG state, without
    the extra negation pass."""
    return torch.rand(x.shape, device=x.device) < p


def _scaled_q(q, inplace: bool = False):
    """q / sqrt(d), the scaling fairseq applies to q (a (T, d) pass instead of a (T, T) one on
    the scores; exact when d is a power of 4, as the paper's 64)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if scale == 1.0:
        return q
    return q.mul_(scale) if inplace else q * scale


def _attn_probs(qs, k, attn_mask):
    """softmax(qs kᵀ [masked]) for contiguous, already scaled qs and k (N..., T, d), in their
    dtype: aten's softmax accumulates reduced precision in fp32 and rounds once (bf16 results
    equal fp32-then-round under AVX2 and the scalar kernels, within 1 ulp on a few entries
    under AVX-512), so no fp32 copy of the (T, T) scores is made."""
    scores = torch.matmul(qs, k.transpose(-2, -1))
    if attn_mask is not None:
        scores.masked_fill_(~attn_mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def _attn_forward(qs, k, v, attn_mask, p):
    """Returns (out, drop) with out = (probs with dropped entries zeroed) @ v / (1 - p); the
    1 / (1 - p) scale is applied to the (T, d) output rather than the (T, T) probabilities.
    ``qs`` is q already scaled by ``_scaled_q``."""
    probs = _attn_probs(qs, k, attn_mask)
    drop = _drop_mask(probs, p)
    out = torch.matmul(probs.masked_fill_(drop, 0.0), v).mul_(1.0 / (1.0 - p))
    return out, drop


def _attn_backward(grad_out, qs, k, v, attn_mask, drop, p):
    """Gradients (q, k, v) of _attn_forward's output (q's through the scaling). The
    probabilities are recomputed (one (T x T) matmul + softmax per head: memory, (B, H, T, T)
    floats per layer, is the scarcer resource here); softmax backward is aten's fused kernel,
    P * (dP - sum(dP * P)) in one pass, instead of four elementwise passes."""
    probs = _attn_probs(qs, k, attn_mask)
    grad_out = grad_out.contiguous() * (1.0 / (1.0 - p))
    grad_v = torch.matmul(torch.where(drop, 0.0, probs).transpose(-2, -1), grad_out)
    grad_p = torch.matmul(grad_out, v.transpose(-2, -1)).masked_fill_(drop, 0.0)
    grad_s = torch.ops.aten._softmax_backward_data(grad_p, probs, -1, probs.dtype)
    del grad_p, probs
    grad_q = _scaled_q(torch.matmul(grad_s, k), inplace=True)
    return grad_q, torch.matmul(grad_s.transpose(-2, -1), qs), grad_v


class _DropoutAttention(torch.autograd.Function):
    """Attention with dropout on the probabilities that saves q, k, v and a bool drop mask only
    (torch's math path keeps the probabilities, a float mask and the dropped probabilities)."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, p):
        dtype = compute_dtype(q)
        ctx.in_dtypes = (q.dtype, k.dtype, v.dtype)
        q, k, v = (t.to(dtype).contiguous() for t in (q, k, v))
        q = _scaled_q(q)
        with no_autocast(q):
            out, drop = _attn_forward(q, k, v, attn_mask, p)
        ctx.p = p
        ctx.save_for_backward(q, k, v, attn_mask, drop)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, attn_mask, drop = ctx.saved_tensors
        with no_autocast(q):
            grads = _attn_backward(grad_out.to(q.dtype), q, k, v, attn_mask, drop, ctx.p)
        return (*(g.to(d) for g, d in zip(grads, ctx.in_dtypes, strict=True)), None, None)


class _PackedDropoutAttention(torch.autograd.Function):
    """_DropoutAttention taking the fused projection qkv (B, T, 3 * D) (q, k, v concatenated
    along features, each H heads of d) and returning (B, T, D) heads-concatenated: the head
    split / merge copies are done once per direction here rather than by autograd's
    unbind/permute/reshape backward (which costs extra full-size copies)."""

    @staticmethod
    def forward(ctx, qkv, num_heads, attn_mask, p):
        bsz, tsz, three_d = qkv.shape
        dim = three_d // 3
        ctx.in_dtype = qkv.dtype
        qkv = qkv.to(compute_dtype(qkv))
        heads = qkv.view(bsz, tsz, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4)
        # a fresh copy (never qkv itself), so q is scaled in place
        q, k, v = heads.clone(memory_format=torch.contiguous_format).unbind(0)
        q = _scaled_q(q, inplace=True)
        with no_autocast(q):
            out, drop = _attn_forward(q, k, v, attn_mask, p)
        ctx.p = p
        ctx.save_for_backward(q, k, v, attn_mask, drop)
        return out.transpose(1, 2).reshape(bsz, tsz, dim)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, attn_mask, drop = ctx.saved_tensors
        bsz, num_heads, tsz, head_dim = q.shape
        grad_out = grad_out.to(q.dtype).view(bsz, tsz, num_heads, head_dim).transpose(1, 2)
        with no_autocast(q):
            grads = _attn_backward(grad_out, q, k, v, attn_mask, drop, ctx.p)
        grad_qkv = torch.empty(
            bsz, tsz, 3, num_heads, head_dim, dtype=ctx.in_dtype, device=q.device
        )
        for i, g in enumerate(grads):
            grad_qkv[:, :, i].copy_(g.transpose(1, 2))
        return grad_qkv.view(bsz, tsz, 3 * num_heads * head_dim), None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d) [masked]) v with dropout on the probabilities.
    q, k, v (B, H, T, d); attn_mask broadcastable to (B, H, T, T), bool, True = may attend."""
    if dropout_p == 0.0 or dropout_p >= 1.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return _DropoutAttention.apply(q, k, v, attn_mask, dropout_p)


def packed_attention(
    qkv: torch.Tensor, num_heads: int, attn_mask: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    """``attention`` on a fused projection: qkv (B, T, 3D) -> (B, T, D) (heads concatenated)."""
    bsz, tsz, three_d = qkv.shape
    dim = three_d // 3
    if dropout_p == 0.0 or dropout_p >= 1.0 or qkv.device.type != "cpu":
        q, k, v = (
            qkv.view(bsz, tsz, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        return out.transpose(1, 2).reshape(bsz, tsz, dim)
    return _PackedDropoutAttention.apply(qkv, num_heads, attn_mask, dropout_p)


def sum_at_least_fp32(t: torch.Tensor, dims) -> torch.Tensor:
    """t.sum(dims) accumulated in fp32 at least (a bias gradient sums B*T bf16 rows)."""
    return t.sum(dims, dtype=torch.promote_types(t.dtype, torch.float32))


class _ConcatLinear(torch.autograd.Function):
    """F.linear(x, cat(weights), cat(biases)) saving x and the separate weights only."""

    @staticmethod
    def forward(ctx, x, n, *params):
        weights, biases = params[:n], params[n:]
        dtype = compute_dtype(x)
        ctx.n, ctx.in_dtype = n, x.dtype
        ctx.sizes = [w.shape[0] for w in weights]
        x = x.to(dtype)
        weight = _cat_as(weights, dtype)
        bias = _cat_as(biases, dtype) if biases else None
        # under autocast the concatenated low-precision weight (half the size of the fp32
        # parameters) is kept for backward instead of being cast again there; in fp32 the
        # parameters themselves are kept and concatenated again in backward
        ctx.cast = dtype != weights[0].dtype
        ctx.save_for_backward(x, weight if ctx.cast else None, *weights)
        with no_autocast(x):
            return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, *weights = ctx.saved_tensors
        grad_y = grad_y.to(x.dtype)
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        with no_autocast(x):
            grad_x = None
            if ctx.needs_input_grad[0]:
                weight = weight if ctx.cast else torch.cat(weights)
                grad_x = torch.matmul(grad_y, weight).to(ctx.in_dtype)
            grad_w = (g2.t() @ x.reshape(-1, x.shape[-1])).split(ctx.sizes)
            grad_b = ()
            if len(ctx.needs_input_grad) > 2 + ctx.n:
                grad_b = sum_at_least_fp32(g2, 0).split(ctx.sizes)
        grad_w = [g.to(w.dtype) for g, w in zip(grad_w, weights, strict=True)]
        grad_b = [g.to(w.dtype) for g, w in zip(grad_b, weights, strict=False)]
        return (grad_x, None, *grad_w, *grad_b)


def _cat_as(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """torch.cat(tensors).to(dtype) in one pass (cat writes the cast values)."""
    rows = sum(t.shape[0] for t in tensors)
    out = torch.empty((rows, *tensors[0].shape[1:]), dtype=dtype, device=tensors[0].device)
    return torch.cat(list(tensors), out=out)


def qkv_linear(x: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
    """cat([lin(x) for lin in linears], -1) as one GEMM (all with bias, or all without)."""
    weights = [lin.weight for lin in linears]
    biases = [lin.bias for lin in linears if lin.bias is not None]
    if biases and len(biases) != len(linears):
        raise ValueError("qkv_linear: either every projection has a bias or none has")
    if not torch.is_grad_enabled():
        return F.linear(x, torch.cat(weights), torch.cat(biases) if biases else None)
    return _ConcatLinear.apply(x, len(weights), *weights, *biases)


# _gelu_dtype_note: fairseq computes the FFN's GELU in fp32 and casts back. aten's GELU and
# gelu_backward kernels (CPU, every ATEN_CPU_CAPABILITY, and CUDA) compute bf16 / fp16 inputs in
# fp32 internally and round once, so calling them on the bf16 tensor gives bit-identical results
# without the two full-size (B, T, FFN) fp32 copies per pass (tests/test_bf16.py checks this).


class _GeluDropoutLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, p):
        dtype = compute_dtype(h)
        ctx.in_dtype = h.dtype
        h = h.to(dtype)
        keep = _keep_mask(h, p) if p > 0.0 else None
        with no_autocast(h):
            a = F.gelu(h)  # fairseq's fp32 utils.gelu: see _gelu_dtype_note
            if keep is not None:
                a = a.masked_fill_(~keep, 0.0).mul_(1.0 / (1.0 - p))
            ctx.p = p
            ctx.has_bias = bias is not None
            ctx.w_dtype = weight.dtype
            weight = weight.to(dtype)  # cast once: kept for backward (see _ConcatLinear)
            ctx.save_for_backward(h, weight, keep)
            return F.linear(a, weight, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, keep = ctx.saved_tensors
        with no_autocast(h):
            return _gelu_dropout_linear_backward(ctx, grad_out.to(h.dtype), h, weight, keep)


def _gelu_dropout_linear_backward(ctx, grad_out, h, weight, keep):
    a = F.gelu(h)
    if keep is not None:
        a = a.masked_fill_(~keep, 0.0).mul_(1.0 / (1.0 - ctx.p))
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    grad_w = (g2.t() @ a.reshape(-1, a.shape[-1])).to(ctx.w_dtype)
    grad_b = sum_at_least_fp32(g2, 0).to(ctx.w_dtype) if ctx.has_bias else None
    grad_a = torch.matmul(grad_out, weight)
    if keep is not None:
        grad_a = grad_a.masked_fill_(~keep, 0.0).mul_(1.0 / (1.0 - ctx.p))
    if ctx.in_dtype != h.dtype:  # h was cast down at the boundary: its gradient in its dtype
        grad_a, h = grad_a.to(ctx.in_dtype), h.to(ctx.in_dtype)
    grad_h = torch.ops.aten.gelu_backward(grad_a, h)
    return grad_h, grad_w, grad_b, None


def gelu_dropout_linear(
    h: torch.Tensor, linear: nn.Linear, p: float, training: bool
) -> torch.Tensor:
    """linear(dropout(gelu(h), p)) with GELU computed in fp32 (fairseq's utils.gelu; see
    _gelu_dtype_note), backward recomputes."""
    p = p if training else 0.0
    if not torch.is_grad_enabled() or not (h.requires_grad or linear.weight.requires_grad):
        return linear(dropout(F.gelu(h), p, p > 0.0))
    return _GeluDropoutLinear.apply(h, linear.weight, linear.bias, p)


class _LayerNormFromOutput(torch.autograd.Function):
    """LayerNorm whose backward rebuilds x̂ = (y - β) / γ from its output instead of keeping the
    input: in post-LN layers y is kept anyway by the next Linear, so the input's copy is saved.
    Under autocast it runs in the autocast dtype with the fp32 affine parameters (aten's
    mixed-dtype kernel normalises in fp32 and rounds the output once): the residual stream of a
    bf16 step stays bf16 instead of being widened to fp32 at every LayerNorm and narrowed again
    by the next Linear. Backward runs in the parameters' dtype (fp32)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        ctx.in_dtype = x.dtype
        x = x.to(compute_dtype(x))
        with no_autocast(x):
            y, _, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)
        ctx.save_for_backward(y, weight, bias, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        y, weight, bias, rstd = ctx.saved_tensors
        # x̂ = (y - β) / γ, then aten's fused LayerNorm backward run on x̂ (mean 0, rstd 1) gives
        # dγ, dβ and rstd⁻¹ · dx in one pass (instead of ~10 elementwise passes)
        # in fp32 (bf16 - fp32 promotes in the same pass): aten's mixed-dtype backward sums
        # dγ and dβ with a few % error for (B*T) rows, far outside bf16's rounding
        x_hat = (y - bias).div_(weight)
        grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
            grad_y.to(weight.dtype).contiguous(),
            x_hat,
            (x_hat.shape[-1],),
            torch.zeros_like(rstd),
            torch.ones_like(rstd),
            weight,
            bias,
            list(ctx.needs_input_grad[:3]),
        )
        if grad_x is not None:  # rstd · (rstd⁻¹ · dx), written in x's dtype in the same pass
            grad_x = torch.mul(grad_x, rstd, out=torch.empty_like(grad_x, dtype=ctx.in_dtype))
        return grad_x, grad_w, grad_b, None


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state dict) that, on CPU in training, saves its output
    rather than its input and, under autocast, computes in the autocast dtype (see
    _LayerNormFromOutput). Falls back to the plain op when an affine weight is so small that
    dividing by it would lose precision."""

    min_abs_weight = 1e-3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        dtype = compute_dtype(x)
        if torch.compiler.is_compiling():  # inductor fuses its own; no data-dependent branch
            with no_autocast(x):
                return F.layer_norm(
                    x.to(dtype), self.normalized_shape, self.weight, self.bias, self.eps
                )
        if (
            torch.is_grad_enabled()
            and self.elementwise_affine
            and self.bias is not None
            and not bool((self.weight.detach().abs() < self.min_abs_weight).any())
        ):
            return _LayerNormFromOutput.apply(x, self.weight, self.bias, self.eps)
        with no_autocast(x):  # the same mixed-dtype kernel: output in the autocast dtype
            return F.layer_norm(
                x.to(dtype), self.normalized_shape, self.weight, self.bias, self.eps
            )
