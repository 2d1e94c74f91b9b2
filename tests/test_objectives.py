"""Pretraining objectives against hand/numpy computations: negatives, InfoNCE, CMSC (incl. the
multi-positive case and a real 2-process gloo all-gather), and the combined criterion."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.objectives import (
    PretrainCriterion,
    cmsc_embeddings,
    cmsc_loss,
    contrastive_logits,
    diversity_loss,
    infonce_accuracy,
    infonce_loss,
    l2_normalize,
    sample_negatives,
)

torch.set_num_threads(1)


def _np_cos(a, b):
    return (a * b).sum(-1) / np.maximum(
        np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-8
    )


def _np_logsumexp(v, axis=-1):
    m = v.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(v - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def test_infonce_tiny_case_matches_numpy():
    # B=1, M=3 masked frames, F=2, 2 negatives chosen by hand: frame t uses the two others
    x = np.array([[[1.0, 0.0], [0.5, 0.5], [-1.0, 2.0]]], dtype=np.float32)
    y = np.array([[[0.8, 0.1], [0.0, 1.0], [-0.3, 0.7]]], dtype=np.float32)
    neg_idx = [[1, 2], [0, 2], [0, 1]]
    negs = np.stack([y[0, [neg_idx[t][k] for t in range(3)]] for k in range(2)])[
        :, None
    ]  # (2,1,3,2)
    logits = contrastive_logits(torch.tensor(x), torch.tensor(y), torch.tensor(negs), 0.1)
    assert logits.shape == (3, 1, 3)
    expected = np.empty((3, 3))
    for t in range(3):
        expected[t] = [_np_cos(x[0, t], y[0, t])] + [_np_cos(x[0, t], y[0, j]) for j in neg_idx[t]]
    expected /= 0.1
    # fp32 cosines of 2-vectors over 0.1: a few roundings, |logit| <= 10
    np.testing.assert_allclose(logits[:, 0, :].T.numpy(), expected, rtol=1e-5, atol=1e-5)
    ce = (_np_logsumexp(expected) - expected[:, 0]).sum()
    assert infonce_loss(logits).item() == pytest.approx(ce, rel=1e-5)
    correct, count = infonce_accuracy(logits)
    assert count == 3 and correct == int((expected.argmax(1) == 0).sum())


def test_negatives_exclude_own_index_and_are_uniform():
    torch.manual_seed(0)
    b, m, n = 2, 5, 8000
    y = torch.randn(b, m, 3)
    gen = torch.Generator().manual_seed(7)
    negs, idx = sample_negatives(y, n, gen)
    assert negs.shape == (n, b, m, 3) and idx.shape == (b, m, n)
    own = torch.arange(m).view(1, m, 1)
    assert not (idx == own).any()
    # every negative is the same sample's frame at the drawn index
    for s in range(b):
        assert torch.equal(negs[:, s].permute(1, 0, 2), y[s][idx[s]])
    # uniform over the m-1 other frames: each count within 5 binomial sigmas of n/(m-1)
    p = 1.0 / (m - 1)
    sigma = math.sqrt(n * p * (1 - p))
    for s in range(b):
        for t in range(m):
            counts = torch.bincount(idx[s, t], minlength=m).numpy()
            assert counts[t] == 0
            others = np.delete(counts, t)
            assert np.all(np.abs(others - n * p) < 5 * sigma), others
    # seeded: the same generator seed gives the same draw
    _, idx2 = sample_negatives(y, n, torch.Generator().manual_seed(7))
    assert torch.equal(idx, idx2)


def test_negative_equal_to_positive_gets_minus_inf():
    y = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # frames 0 and 1 bit-identical
    x = torch.tensor([[[1.0, 0.2], [0.3, 1.0], [0.5, 0.5]]])
    negs = torch.stack([y[:, [1, 0, 0]], y[:, [2, 2, 1]]])  # (2, 1, 3, 2)
    logits = contrastive_logits(x, y, negs, 0.1)
    assert torch.isneginf(logits[1, 0, 0]) and torch.isneginf(logits[1, 0, 1])
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[2]).all()
    assert torch.isfinite(logits[1, 0, 2])  # frame 2's negative (frame 0) differs from it
    loss = infonce_loss(logits)
    assert torch.isfinite(loss)
    # frame 0: only the positive and frame 2 remain in the softmax
    l0 = torch.logsumexp(logits[[0, 2], 0, 0], 0) - logits[0, 0, 0]
    l1 = torch.logsumexp(logits[[0, 2], 0, 1], 0) - logits[0, 0, 1]
    l2 = torch.logsumexp(logits[:, 0, 2], 0) - logits[0, 0, 2]
    assert loss.item() == pytest.approx((l0 + l1 + l2).item(), rel=1e-6)


def test_accuracy_skips_degenerate_rows():
    logits = torch.tensor([[[5.0, 1.0, 2.0]], [[1.0, 1.0, 3.0]], [[0.0, 1.0, 1.0]]])  # (3,1,3)
    # rows: frame0 [5,1,0] correct; frame1 [1,1,1] degenerate; frame2 [2,3,1] wrong
    assert infonce_accuracy(logits) == (1, 3)


def test_diversity():
    assert diversity_loss(torch.tensor(640.0), 640).item() == 0.0
    assert diversity_loss(torch.tensor(160.0), 640).item() == pytest.approx(0.75)


def _np_cmsc(h, segment, group, temp):
    a, b = h[segment == 0], h[segment == 1]
    ga, gb = group[segment == 0], group[segment == 1]
    s = a @ b.T / temp
    pos = ga[:, None] == gb[None, :]
    lr = s - _np_logsumexp(s, 1)[:, None]
    lc = s.T - _np_logsumexp(s.T, 1)[:, None]
    return 0.5 * (-lr[pos].mean()) + 0.5 * (-lc[pos.T].mean())


def test_cmsc_hand_values_single_and_multi_positive():
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # pairs (A0,B0), (A1,B1)
    seg = torch.tensor([0, 1, 0, 1])
    single = cmsc_loss(h, seg, torch.tensor([1, 1, 2, 2]), 0.1)
    # a log-softmax over logits of 10 may round at 10's fp32 spacing (9.5e-7) in some kernels
    assert single.item() == pytest.approx(math.log1p(math.exp(-10)), abs=1e-6)
    multi = cmsc_loss(h, seg, torch.tensor([3, 3, 3, 3]), 0.1)  # both pairs share a group
    expected = 0.5 * (math.log1p(math.exp(-10)) + math.log1p(math.exp(10)))
    assert multi.item() == pytest.approx(expected, rel=1e-5)


def test_cmsc_matches_numpy_on_random_embeddings():
    rng = np.random.default_rng(3)
    h = rng.normal(size=(12, 16)).astype(np.float32)
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    seg = np.array([0, 1] * 6)
    group = np.repeat([10, 11, 10, 12, 13, 11], 2)  # pairs 0&2 and 1&5 share groups
    for g in (np.repeat(np.arange(6), 2), group):
        got = cmsc_loss(torch.tensor(h), torch.tensor(seg), torch.tensor(g), 0.1).item()
        # fp32 16-term dots over 0.1 (|logit| <= 10), logsumexp over 6: ~sqrt(16)*eps*10 each
        assert got == pytest.approx(_np_cmsc(h.astype(np.float64), seg, g, 0.1), rel=1e-5)


def test_l2_normalize_detached_norm_and_embeddings():
    h = torch.tensor([[3.0, 4.0], [0.0, 0.0]], requires_grad=True)
    out = l2_normalize(h)
    torch.testing.assert_close(out.detach(), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    w = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    (out * w).sum().backward()
    # the norm is a constant for autograd: d/dh = w / max(||h||, eps)
    torch.testing.assert_close(h.grad, torch.stack([w[0] / 5.0, w[1] / 1e-8]))
    frames = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    emb = cmsc_embeddings({"frames": frames})
    pooled = frames.mean(1)
    torch.testing.assert_close(emb, pooled / pooled.norm(dim=1, keepdim=True))
    pad = torch.tensor([[False, False, True], [False, False, False]])
    emb = cmsc_embeddings({"frames": frames, "padding_mask": pad})
    first = frames[0, :2].mean(0)
    torch.testing.assert_close(emb[0], first / first.norm())


def _net_output(b=4, m=6, f=8, t=10, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(b, m, f, generator=g, requires_grad=True),
        "y": torch.randn(b, m, f, generator=g),
        "frames": torch.randn(b, t, d, generator=g, requires_grad=True),
        "features_pen": torch.tensor(0.25),
        "prob_perplexity": torch.tensor(480.0),
        "code_perplexity": torch.tensor(300.0),
        "num_vars": 640,
        "temp": 1.9,
    }


def test_criterion_combines_terms_with_switches():
    out = _net_output()
    batch = {"segment": torch.tensor([0, 1, 0, 1]), "group": torch.tensor([1, 1, 2, 2])}
    negs, _ = sample_negatives(out["y"], 100, torch.Generator().manual_seed(5))
    infonce = infonce_loss(contrastive_logits(out["x"], out["y"], negs, 0.1)).item()
    cmsc = cmsc_loss(cmsc_embeddings(out), batch["segment"], batch["group"], 0.1).item()
    s = 4 * 6
    div = (640 - 480) / 640

    # below: the same fp32 terms summed in another order (rel 1e-5 ~ 80 eps)
    total, size, logs = PretrainCriterion()(out, batch, torch.Generator().manual_seed(5))
    assert size == s
    assert total.item() == pytest.approx(infonce + s * (0.1 * div + 10 * 0.25) + s * cmsc, rel=1e-5)
    assert logs["loss"] == pytest.approx(total.item() / s / math.log(2))
    assert logs["w2v_loss"] == pytest.approx(infonce / s / math.log(2), rel=1e-6)
    assert logs["cmsc_loss"] == pytest.approx(cmsc / math.log(2), rel=1e-6)
    assert logs["prob_perplexity"] == 480.0 and logs["temp"] == pytest.approx(1.9)

    w2v_only, size, logs = PretrainCriterion(cmsc=False)(
        out, batch, torch.Generator().manual_seed(5)
    )
    assert size == s and "cmsc_loss" not in logs
    assert w2v_only.item() == pytest.approx(infonce + s * (0.1 * div + 2.5), rel=1e-5)

    cmsc_only, size, logs = PretrainCriterion(w2v=False, cmsc_weight=2.0)(
        {"frames": out["frames"]}, batch
    )
    assert size == 4 and cmsc_only.item() == pytest.approx(4 * 2.0 * cmsc, rel=1e-5)
    cmsc_only.backward()
    assert out["frames"].grad is not None and out["frames"].grad.abs().sum() > 0

    with pytest.raises(ValueError, match="at least one"):
        PretrainCriterion(w2v=False, cmsc=False)


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        h_all, seg_all, group_all, owner = _gather_case()
        mine = owner == rank
        h = h_all[mine].clone().requires_grad_(True)
        loss = cmsc_loss(l2_normalize(h), seg_all[mine], group_all[mine], 0.1, all_gather=True)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": h.grad}, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _gather_case():
    g = torch.Generator().manual_seed(11)
    h = torch.randn(10, 6, generator=g)  # 5 pairs
    seg = torch.tensor([0, 1] * 5)
    group = torch.tensor([4, 4, 5, 5, 4, 4, 6, 6, 5, 5])  # groups shared across ranks
    owner = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])  # 2 pairs on rank 0, 3 on rank 1
    return h, seg, group, owner


def test_cmsc_all_gather_two_process_gloo(tmp_path):
    # fork: the children need not re-import torch (spawn costs ~10 s on a busy 2-core box)
    mp.start_processes(
        _gather_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    res = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(2)]
    h, seg, group, owner = _gather_case()
    h = h.clone().requires_grad_(True)
    ref = cmsc_loss(l2_normalize(h), seg, group, 0.1)
    ref.backward()
    # the gathered similarity matrix is summed in another order than the one-process one
    assert (res[0]["loss"] + res[1]["loss"]).item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(res[0]["grad"], h.grad[owner == 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res[1]["grad"], h.grad[owner == 1], rtol=1e-5, atol=1e-6)


def test_contrastive_logits_equal_torch_cosine_similarity_with_gradients():
    """The written-out cosine (no full-size division) must equal torch.cosine_similarity."""
    import torch

    from training.objectives.wav2vec2 import contrastive_logits, sample_negatives

    torch.manual_seed(3)
    x0, y0 = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    x0[0, 0] = 0.0  # a zero vector exercises the eps clamp
    results = []
    for kind in ("ours", "torch"):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        negs, _ = sample_negatives(y, 5, generator=torch.Generator().manual_seed(0))
        if kind == "ours":
            logits = contrastive_logits(x, y, negs, 0.1)
        else:
            targets = torch.cat([y.unsqueeze(0), negs], 0)
            logits = torch.cosine_similarity(x.unsqueeze(0), targets, dim=-1) / 0.1
        (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
        results.append((logits.detach(), x.grad, y.grad))
    # two fp32 formulas of a 16-term cosine over 0.1 (|logit| <= 10)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
