"""The memory-lean and fused ops of the encoder (training/models/lean_ops.py, the positional
convolution) against the straightforward PyTorch formulation: forward and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from training.models.lean_ops import (
    LayerNorm,
    _keep_mask,
    attention,
    dropout,
    gelu_dropout_linear,
    packed_attention,
)
from training.models.positional import ConvPositionalEmbedding, grouped_conv1d

torch.set_num_threads(1)
# Comparisons run in float64 where sums are reordered: ~sqrt(K)*1e-16, far below assert_close's
# float64 default (rtol 1e-7); the float32 dropout checks are one elementwise rounding each.


def test_lean_dropout_and_gelu_linear_match_reference():
    torch.manual_seed(6)
    x = torch.randn(4000, requires_grad=True)
    y = dropout(x, 0.3, True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.03
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.7)
    # fused GELU -> dropout -> Linear against the plain composition, with the same mask
    lin = torch.nn.Linear(8, 4).double()
    h = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    for p in (0.0, 0.25):
        assert torch.autograd.gradcheck(
            lambda t, p=p: (torch.manual_seed(3), gelu_dropout_linear(t, lin, p, True))[1], (h,)
        )
    for p in (0.0, 0.25):
        torch.manual_seed(11)
        out = gelu_dropout_linear(h, lin, p, True)
        torch.manual_seed(11)
        keep = _keep_mask(h, p) if p else torch.ones_like(h, dtype=torch.bool)
        ref = lin(F.gelu(h) * keep / (1 - p))
        torch.testing.assert_close(out, ref)
        g1 = torch.autograd.grad(out.sum(), (h, lin.weight, lin.bias))
        g2 = torch.autograd.grad(ref.sum(), (h, lin.weight, lin.bias))
        for a, b in zip(g1, g2, strict=True):
            torch.testing.assert_close(a, b)


def test_lean_layer_norm_matches_torch():
    torch.manual_seed(12)
    ln = LayerNorm(8, eps=1e-5).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ln, (x,))
    out = ln(x)
    assert out.grad_fn.__class__.__name__.startswith("_LayerNormFromOutput")
    ref = F.layer_norm(x, (8,), ln.weight, ln.bias, 1e-5)
    torch.testing.assert_close(out, ref)
    g1 = torch.autograd.grad((out * ref.detach()).sum(), (x, ln.weight, ln.bias))
    g2 = torch.autograd.grad((ref * ref.detach()).sum(), (x, ln.weight, ln.bias))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        ln.weight[3] = 0.0  # cannot divide by it: the plain op is used
    assert not ln(x).grad_fn.__class__.__name__.startswith("_LayerNormFromOutput")


def test_dropout_attention_matches_formula_and_gradcheck():
    torch.manual_seed(8)
    q, k, v = (torch.randn(2, 2, 7, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    allow = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    allow[1, ..., 5:] = False

    def seeded(*qkv):  # the same dropout mask on every call
        torch.manual_seed(9)
        return attention(*qkv, allow, 0.2)

    out = seeded(q, k, v)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(3)).masked_fill(~allow, float("-inf"))
    probs = torch.softmax(scores, -1)
    torch.manual_seed(9)
    keep = _keep_mask(probs, 0.2)
    ref = (probs * keep / 0.8) @ v
    torch.testing.assert_close(out, ref)
    g1 = torch.autograd.grad(out.square().sum(), (q, k, v))
    g2 = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(seeded, (q, k, v))
    torch.testing.assert_close(attention(q, k, v, allow, 0.0), probs @ v)


def test_packed_attention_matches_formula_and_gradcheck():
    """The fused-q/k/v path equals the (B, H, T, d) formulation, forward and gradients."""
    torch.manual_seed(13)
    bsz, tsz, heads, hd = 2, 7, 2, 3
    qkv = torch.randn(bsz, tsz, 3 * heads * hd, dtype=torch.float64, requires_grad=True)
    allow = torch.ones(bsz, 1, 1, tsz, dtype=torch.bool)
    allow[1, ..., 5:] = False

    def seeded(t, p=0.2):
        torch.manual_seed(9)
        return packed_attention(t, heads, allow, p)

    out = seeded(qkv)
    q, k, v = qkv.view(bsz, tsz, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    probs = torch.softmax(
        (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~allow, float("-inf")), -1
    )
    torch.manual_seed(9)
    keep = _keep_mask(probs, 0.2)
    ref = ((probs * keep / 0.8) @ v).transpose(1, 2).reshape(bsz, tsz, heads * hd)
    torch.testing.assert_close(out, ref)
    g1 = torch.autograd.grad(out.square().sum(), qkv)
    g2 = torch.autograd.grad(ref.square().sum(), qkv)
    torch.testing.assert_close(g1, g2)
    assert torch.autograd.gradcheck(seeded, (qkv,))
    ref0 = (probs @ v).transpose(1, 2).reshape(bsz, tsz, heads * hd)
    torch.testing.assert_close(seeded(qkv, 0.0), ref0)


def test_self_attention_fused_projection_matches_separate():
    """SelfAttention's one-GEMM q/k/v projection equals three nn.Linear calls (eval, no dropout)."""
    from training.models.transformer import SelfAttention

    torch.manual_seed(14)
    attn = SelfAttention(16, 4, dropout=0.1).double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    out = attn(x)

    def heads(t):
        return t.view(2, 5, 4, 4).transpose(1, 2)

    ref = F.scaled_dot_product_attention(
        heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    )
    ref = attn.out_proj(ref.transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(out, ref)
    params = (x, attn.q_proj.weight, attn.k_proj.bias, attn.v_proj.weight)
    for a, b in zip(
        torch.autograd.grad(out.square().sum(), params),
        torch.autograd.grad(ref.square().sum(), params),
        strict=True,
    ):
        torch.testing.assert_close(a, b)
    assert set(attn.state_dict()) == {
        f"{n}_proj.{p}" for n in ("q", "k", "v", "out") for p in ("weight", "bias")
    }


@pytest.mark.parametrize("kernel,groups", [(5, 2), (4, 2), (128, 16)])
def test_grouped_conv1d_and_positional_conv_match_torch(kernel, groups):
    """grouped_conv1d's custom backward (input gradient as a flipped-kernel forward conv) and the
    positional embedding's asymmetric padding equal conv1d(padding=k/2) + SamePad + GELU."""
    torch.manual_seed(15)
    dim, tsz = (16, 11) if kernel < 100 else (64, 40)
    x = torch.randn(2, dim, tsz + kernel - 1, dtype=torch.float64, requires_grad=True)
    w = torch.randn(dim, dim // groups, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(dim, dtype=torch.float64, requires_grad=True)
    if kernel < 100:
        assert torch.autograd.gradcheck(lambda *t: grouped_conv1d(*t, groups), (x, w, b))
    out, ref = grouped_conv1d(x, w, b, groups), F.conv1d(x, w, b, groups=groups)
    torch.testing.assert_close(out, ref)
    gy = torch.randn_like(ref)
    for g1, g2 in zip(
        torch.autograd.grad(out, (x, w, b), gy),
        torch.autograd.grad(ref, (x, w, b), gy),
        strict=True,
    ):
        torch.testing.assert_close(g1, g2)

    pos = ConvPositionalEmbedding(dim, kernel, groups).double()
    h = torch.randn(2, tsz, dim, dtype=torch.float64, requires_grad=True)
    out = pos(h)
    conv = pos.conv
    ref = F.conv1d(h.transpose(1, 2), conv.weight, conv.bias, padding=kernel // 2, groups=groups)
    ref = F.gelu(ref[:, :, :tsz]).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    params = (h, *pos.parameters())
    gy = torch.randn_like(ref)
    g_out, g_ref = torch.autograd.grad(out, params, gy), torch.autograd.grad(ref, params, gy)
    for g1, g2 in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(g1, g2)
