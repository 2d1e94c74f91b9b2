"""ArcFace head and loss: hand-computed logits, both margin branches, finite gradients at |cos|=1"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.objectives.arcface import ArcFaceHead, apply_margin, arcface_loss

torch.set_num_threads(1)
EPS32 = torch.finfo(torch.float32).eps


def _head_with_rows(rows, scale=192.0, margin=1.0):
    rows = torch.tensor(rows, dtype=torch.float32)
    head = ArcFaceHead(rows.shape[1], rows.shape[0], scale=scale, margin=margin)
    with torch.no_grad():
        head.kernel.copy_(rows)
    return head


def test_logits_match_hand_computed_values_in_both_branches():
    # class rows (unnormalised on purpose: the head normalises them)
    head = _head_with_rows([[2.0, 0.0], [0.0, 3.0], [-5.0, 0.0]])
    e = torch.tensor(
        [
            [0.6, 0.8],  # cos = 0.6, 0.8, -0.6
            [-0.9, math.sqrt(1 - 0.81)],
        ]
    )  # cos = -0.9, 0.436, 0.9
    cos = head.cosine(e)
    assert torch.allclose(
        cos, torch.tensor([[0.6, 0.8, -0.6], [-0.9, math.sqrt(0.19), 0.9]]), atol=1e-6
    )
    labels = torch.tensor([0, 0])
    logits = head.margin_logits(cos, labels) / 192.0
    # sample 0, target cos 0.6 > cos(pi - 1) = -0.5403: cos(theta + 1) = 0.6 cos1 - 0.8 sin1
    assert logits[0, 0].item() == pytest.approx(0.6 * math.cos(1) - 0.8 * math.sin(1), abs=1e-5)
    assert logits[0, 0].item() == pytest.approx(-0.34898, abs=1e-4)
    # sample 1, target cos -0.9 <= -0.5403 (theta + m > pi): fallback cos - m sin m
    assert logits[1, 0].item() == pytest.approx(-0.9 - math.sin(1), abs=1e-6)
    assert logits[1, 0].item() == pytest.approx(-1.74147, abs=1e-4)
    # non-target logits are the plain cosines
    assert torch.allclose(logits[:, 1:], cos[:, 1:])
    # loss = sum of cross-entropies of the scaled logits, sample size = batch
    loss, n, logs = arcface_loss(head, e, labels)
    expected = F.cross_entropy(192.0 * logits, labels, reduction="sum")
    assert n == 2 and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # accuracy is argmax over the unmargined cosines: sample 0 -> class 1, sample 1 -> class 2
    assert logs["accuracy"] == 0.0


def test_branches_at_the_threshold():
    # just above cos(pi - m) the margin branch reaches cos(pi) = -1; just below, the original's
    # fallback cos - m sin m takes over (a jump to -1.38 for m = 1, as in the original)
    m = 1.0
    t = math.cos(math.pi - m)
    cos = torch.tensor([[t + 1e-6, 0.0], [t - 1e-6, 0.0]], dtype=torch.float64)
    out = apply_margin(cos, torch.tensor([0, 0]), m)
    assert out[0, 0].item() == pytest.approx(-1.0, abs=2e-3)
    assert out[1, 0].item() == pytest.approx(t - m * math.sin(m), abs=1e-5)
    # both branches are increasing in cos (a larger similarity never lowers the target logit)
    grid = torch.linspace(-1, 1, 401, dtype=torch.float64)[:, None].repeat(1, 2)
    target = apply_margin(grid, torch.zeros(401, dtype=torch.long), m)[:, 0]
    above = grid[:, 0] > t
    assert (target[above].diff() >= -1e-9).all() and (target[~above].diff() >= -1e-9).all()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gradients_are_finite_at_cos_plus_minus_one(sign):
    head = _head_with_rows([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    e = torch.tensor([[sign, 0.0, 0.0]], requires_grad=True)  # exactly (anti)parallel to class 0
    loss, _, _ = arcface_loss(head, e, torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(e.grad).all() and torch.isfinite(head.kernel.grad).all()
    # the naive sqrt(1 - cos^2) of the original has an infinite derivative here
    c = torch.tensor(sign, dtype=torch.float32, requires_grad=True)
    torch.sqrt(1 - c * c).backward()
    assert not torch.isfinite(c.grad)


def test_kernel_init_reproduces_the_column_renorm_quirk():
    torch.manual_seed(0)
    head = ArcFaceHead(16, 40)
    k = head.kernel.detach()
    # renorm_(2, dim=1, 1e-5) * 1e5 normalises each feature column, not each class row
    assert torch.allclose(k.norm(dim=0), torch.ones(16), atol=1e-4)
    assert not torch.allclose(k.norm(dim=1), torch.ones(40), atol=1e-2)
    # ... which does not matter: cosines use normalised rows and are bounded by 1
    e = torch.randn(5, 16)
    cos = head.cosine(e)
    ref = F.normalize(e, dim=1) @ F.normalize(k, dim=1).T
    # fp32 dots of unit vectors (16 terms) in any order: each within 16*eps of the exact value
    assert torch.allclose(cos, ref, atol=4 * 16 * EPS32)


def test_loss_matches_independent_numpy_computation():
    torch.manual_seed(1)
    head = ArcFaceHead(8, 6, scale=30.0, margin=0.5)
    e = torch.randn(10, 8)
    labels = torch.randint(0, 6, (10,))
    loss, _n, logs = arcface_loss(head, e, labels)
    en = e.numpy() / np.linalg.norm(e.numpy(), axis=1, keepdims=True)
    kn = head.kernel.detach().numpy()
    kn = kn / np.linalg.norm(kn, axis=1, keepdims=True)
    cos = np.clip(en @ kn.T, -1, 1).astype(np.float64)
    rows = np.arange(10)
    c = cos[rows, labels.numpy()]
    theta = np.arccos(c)
    target = np.where(c > np.cos(np.pi - 0.5), np.cos(theta + 0.5), c - 0.5 * np.sin(0.5))
    z = cos.copy()
    z[rows, labels.numpy()] = target
    z *= 30.0
    ce = -(z[rows, labels.numpy()] - np.log(np.exp(z).sum(axis=1)))
    assert loss.item() == pytest.approx(ce.sum(), rel=1e-4)
    assert logs["accuracy"] == pytest.approx(np.mean(cos.argmax(1) == labels.numpy()))


def test_training_the_head_separates_classes():
    torch.manual_seed(2)
    centres = F.normalize(torch.randn(4, 16), dim=1)
    labels = torch.arange(4).repeat_interleave(8)
    x = centres[labels] + 0.3 * torch.randn(32, 16)
    head = ArcFaceHead(16, 4, scale=16.0, margin=0.3)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        loss, _n, logs = arcface_loss(head, x, labels)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert logs["accuracy"] == 1.0


def test_cosines_stay_float32_under_bf16_autocast():
    torch.manual_seed(3)
    head = ArcFaceHead(32, 10)
    e = torch.randn(4, 32)
    ref = head.cosine(e)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos = head.cosine(e)
    # fp32 dots of unit vectors (32 terms), maybe another kernel: within 32*eps each (bf16: ~1e-2)
    assert cos.dtype == torch.float32 and torch.allclose(cos, ref, atol=4 * 32 * EPS32)
