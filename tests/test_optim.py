"""Adam with decoupled weight decay and the lr schedules, against hand-computed values."""

import math

import pytest
import torch

from training.optim import LRSchedule, build_optimizer
from training.run_config import OptimConfig

torch.set_num_threads(1)


def _reference_step(w, g, m, v, t, lr, b1, b2, eps, wd):
    """The definition: p <- p - lr*wd*p, then Adam with bias correction (scalar python)."""
    w = w - lr * wd * w
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
    return w - lr * mhat / (math.sqrt(vhat) + eps), m, v


def test_adam_decoupled_weight_decay_matches_hand_computed_update():
    cfg = OptimConfig(lr=0.1, betas=[0.9, 0.98], eps=1e-6, weight_decay=0.01)
    a = torch.nn.Parameter(torch.tensor(1.5))
    b = torch.nn.Parameter(torch.tensor(-2.0))
    opt = build_optimizer([a, b], cfg)
    # loss = a^2 * b + 3a  ->  da = 2ab + 3, db = a^2
    ref = {"a": [1.5, 0.0, 0.0], "b": [-2.0, 0.0, 0.0]}
    for t in (1, 2, 3):
        wa, wb = ref["a"][0], ref["b"][0]
        ga, gb = 2 * wa * wb + 3, wa * wa
        ref["a"] = list(_reference_step(wa, ga, *ref["a"][1:], t, 0.1, 0.9, 0.98, 1e-6, 0.01))
        ref["b"] = list(_reference_step(wb, gb, *ref["b"][1:], t, 0.1, 0.9, 0.98, 1e-6, 0.01))
        opt.zero_grad()
        (a * a * b + 3 * a).backward()
        opt.step()
        assert a.item() == pytest.approx(ref["a"][0], rel=1e-6, abs=1e-7)
        assert b.item() == pytest.approx(ref["b"][0], rel=1e-6, abs=1e-7)
    # hand value of the first step of a: 1.5*(1-0.001) - 0.1*g/(|g|+1e-6) with g = -3 < 0
    a2 = torch.nn.Parameter(torch.tensor(1.5))
    opt2 = build_optimizer([a2], cfg)
    a2.grad = torch.tensor(-3.0)
    opt2.step()
    assert a2.item() == pytest.approx(1.4985 + 0.1 * 3 / (3 + 1e-6), abs=1e-6)


def test_weight_decay_is_decoupled_and_applies_to_every_parameter():
    # a zero gradient: Adam's update is 0, so only the decay p*(1 - lr*wd) remains.
    # (L2-in-the-gradient Adam would move the weight by ~lr instead.)
    lin = torch.nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.fill_(2.0)
        lin.bias.fill_(-4.0)
    opt = build_optimizer(lin.parameters(), OptimConfig(lr=0.5, weight_decay=0.1))
    for p in lin.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(lin.weight, torch.full_like(lin.weight, 2.0 * 0.95))
    assert torch.allclose(lin.bias, torch.full_like(lin.bias, -4.0 * 0.95))  # biases too


def test_tri_stage_schedule_at_stage_boundaries():
    s = LRSchedule(
        OptimConfig(
            lr=1.0,
            schedule="tri_stage",
            max_update=100,
            phase_ratio=[0.1, 0.2, 0.7],
            init_lr_scale=0.01,
            final_lr_scale=0.01,
        )
    )
    assert s.lr_at(0) == pytest.approx(0.01)  # warmup starts at 0.01*lr
    assert s.lr_at(5) == pytest.approx(0.01 + 0.99 * 5 / 10)  # linear warmup
    assert s.lr_at(10) == pytest.approx(1.0)  # hold
    assert s.lr_at(29) == pytest.approx(1.0)
    assert s.lr_at(30) == pytest.approx(1.0)  # decay starts at lr
    assert s.lr_at(65) == pytest.approx(0.1)  # half-way: sqrt(0.01)
    assert s.lr_at(100) == pytest.approx(0.01)  # end of decay
    assert s.lr_at(500) == pytest.approx(0.01)  # constant afterwards


def test_cosine_and_fixed_schedules():
    c = LRSchedule(
        OptimConfig(
            lr=2.0, schedule="cosine", warmup_updates=10, max_update=110, final_lr_scale=0.0
        )
    )
    assert c.lr_at(0) == pytest.approx(0.2)  # (0+1)/10 of the peak
    assert c.lr_at(9) == pytest.approx(2.0)
    assert c.lr_at(10) == pytest.approx(2.0)
    assert c.lr_at(60) == pytest.approx(1.0)  # cosine midpoint
    assert c.lr_at(110) == pytest.approx(0.0, abs=1e-12)
    assert c.lr_at(200) == pytest.approx(0.0, abs=1e-12)
    f = LRSchedule(OptimConfig(lr=5e-5, schedule="fixed"))
    assert [f.lr_at(u) for u in (0, 1, 10_000)] == [5e-5] * 3
    w = LRSchedule(OptimConfig(lr=1.0, schedule="fixed", warmup_updates=4))
    assert [w.lr_at(u) for u in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimConfig(lr=1.0))
    assert w.apply(opt, 1) == 0.5 and opt.param_groups[0]["lr"] == 0.5
