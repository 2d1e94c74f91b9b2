"""bf16 is the same method as fp32: the precision resolver's choices, the lean ops under autocast,
50 pretraining updates and the neighbour ranking of the parity fixture's embeddings.

Tolerances come from bf16's 8-bit significand (7 stored bits + the implicit one): rounding a
value to bf16 moves it by at most u = 2^-8 ≈ 0.39 % of its magnitude. A GEMM under autocast
rounds both inputs (≤ 2u on each product) and its output (u), with fp32 accumulation in between,
so one op's result is within ~3u relative; independent roundings of random data add in
quadrature, so the norm-wise error of a whole tensor stays near u. The tests allow 4u for a
forward (one op plus the fp32 reference's own ordering) and 8u for gradients (backward chains two
rounded GEMMs). On a CPU without native bf16 the same ops run emulated: same numbers, slower.
"""

import contextlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from training.models import lean_ops
from training.models.positional import grouped_conv1d
from training.precision import CPU_BF16_ENV, autocast, cpu_has_native_bf16, resolve_precision

torch.set_num_threads(1)
U = 2.0**-8  # bf16 unit roundoff
FIX = Path(__file__).parent / "fixtures" / "fairseq_signals"


# --- the resolver ------------------------------------------------------------------------------


def test_resolver_choices(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # explicit choices are kept
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    cuda_auto = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    assert resolve_precision("auto", "cuda") == cuda_auto
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", "cpu")
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=CPU_BF16_ENV):
        resolve_precision("auto", "cpu")
    monkeypatch.delenv(CPU_BF16_ENV)
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert cpu_has_native_bf16() == native
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expect"),
    [(False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16"), (True, True, "bf16")],
)
def test_auto_follows_the_cpu_flags(monkeypatch, amx, avx512_bf16, expect):
    """An AVX2-only CPU (neither AMX nor AVX512_BF16) gets fp32 from `auto`: never slower than
    before precision existed; either native bf16 unit gets bf16."""
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert cpu_has_native_bf16() == (expect == "bf16")
    assert resolve_precision("auto", "cpu") == expect


def test_autocast_contexts(monkeypatch):
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
        assert torch.ones(2, 2).mm(torch.ones(2, 2)).dtype == torch.float32
    with autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.ones(2, 2).mm(torch.ones(2, 2)).dtype == torch.bfloat16
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    with autocast("auto", "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_run_config_precision_is_validated():
    from training.run_config import ConfigError, RunConfig

    assert RunConfig().precision == "auto"
    assert RunConfig.from_dict({"precision": "bf16"}).precision == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        RunConfig.from_dict({"precision": "fp16"})


# --- lean ops under autocast -------------------------------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def _run(fn, inputs, precision, seed=3):
    """fn(*leaves) in `precision` (inputs given in fp32): output and gradients of a fixed
    random projection of it, every gradient in its leaf's dtype."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    torch.manual_seed(seed)  # same dropout masks in both precisions (drawn in fp32)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else None
    with ctx or contextlib.nullcontext():
        out = fn(*leaves)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out.float() * gy).sum().backward()
    grads = [t.grad for t in leaves if t.requires_grad]
    assert all(g is not None and g.dtype == t.dtype for g, t in zip(grads, leaves, strict=False))
    return out, grads


def _lean_cases():
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def linear(w, b):  # what the ops read of an nn.Linear
        return SimpleNamespace(weight=w, bias=b)

    mask = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    mask[1, ..., 20:] = False
    return {
        "attention": (lambda q, k, v: lean_ops.attention(q, k, v, mask, 0.1), [r(2, 4, 24, 8)] * 3),
        "packed_attention": (
            lambda qkv: lean_ops.packed_attention(qkv, 4, mask, 0.1),
            [r(2, 24, 96)],
        ),
        "qkv_linear": (
            lambda x, *p: lean_ops.qkv_linear(
                x, [linear(w, b) for w, b in zip(p[:3], p[3:], strict=True)]
            ),
            [r(2, 24, 32), *(r(32, 32, scale=0.2) for _ in range(3)), *(r(32) for _ in range(3))],
        ),
        "gelu_dropout_linear": (
            lambda h, w, b: lean_ops.gelu_dropout_linear(h, linear(w, b), 0.1, True),
            [r(2, 24, 64), r(32, 64, scale=0.2), r(32)],
        ),
        "layer_norm": (lambda x: lean_ops.LayerNorm(32)(x), [r(2, 24, 32, scale=3.0)]),
        "dropout": (lambda x: lean_ops.Dropout(0.1)(x), [r(2, 24, 32)]),
        "grouped_conv1d": (
            lambda x, w, b: grouped_conv1d(x, w, b, 4),
            [r(2, 32, 40), r(32, 8, 9, scale=0.1), r(32)],
        ),
    }


@pytest.mark.parametrize("name", list(_lean_cases()))
def test_lean_ops_under_autocast_match_fp32(name):
    fn, inputs = _lean_cases()[name]
    ref, ref_grads = _run(fn, inputs, "fp32")
    out, grads = _run(fn, inputs, "bf16")
    assert _rel(out, ref) <= 4 * U, name
    for g, rg in zip(grads, ref_grads, strict=True):
        assert _rel(g, rg) <= 8 * U, name
    if name in ("attention", "packed_attention", "qkv_linear", "gelu_dropout_linear"):
        assert out.dtype == torch.bfloat16  # the work was done in bf16, not silently in fp32
        assert _rel(out, ref) > 0


def test_lean_ops_are_exact_outside_autocast():
    """Without autocast the boundary casts are no-ops: fp32 in, fp32 out, as before."""
    fn, inputs = _lean_cases()["packed_attention"]
    a, ga = _run(fn, inputs, "fp32")
    b, gb = _run(fn, inputs, "fp32")
    assert a.dtype == torch.float32 and torch.equal(a, b) and torch.equal(ga[0], gb[0])


# --- 50 pretraining updates --------------------------------------------------------------------


def _pretrain_losses(task, batches, precision: str, updates: int) -> list[float]:
    from training.optim import LRSchedule, build_optimizer
    from training.step import apply_update

    torch.manual_seed(0)
    model = task.build_model().train()
    optimizer = build_optimizer(model.parameters(), task.cfg.optim)
    schedule = LRSchedule(task.cfg.optim)
    losses = []
    for u in range(updates):
        with autocast(precision, "cpu"):
            loss, n, _ = task.train_step(model, batches[u % len(batches)], u)
        loss.backward()
        apply_update(model, optimizer, schedule, u, n)
        losses.append(loss.item() / n)
    return losses


def test_tiny_preset_trains_the_same_in_bf16(tmp_path):
    """50 updates of W2V+CMSC+RLM (tiny preset, 2 pairs, one seed, same batches) in fp32 and
    bf16. Tolerance: each logged loss within 4u relative (the logits come from bf16 features,
    each off by ≤ u relative, then the trajectories drift a little apart over 50 updates of
    bf16 gradients); the mean over the run within u (a systematic bias would show there)."""
    from helpers import prepare_synthetic

    from training.run_config import load_config
    from training.tasks.pretrain import PretrainTask

    shards = prepare_synthetic(
        tmp_path, 8, 1, seconds=20, valid=0.0, shard_splits=("train",), max_count=16
    )["shards"]
    cfg = load_config(
        "w2v_cmsc_rlm",
        [
            f"data.shards={shards}",
            "model.preset=tiny",
            "data.batch_size=2",
            "data.num_workers=0",
            "criterion.num_negatives=10",
            "logging.wandb_mode=disabled",
        ],
    )
    task = PretrainTask(cfg)
    batches = list(task.train_batches(0, 1, 1))
    fp32 = np.array(_pretrain_losses(task, batches, "fp32", 50))
    bf16 = np.array(_pretrain_losses(task, batches, "bf16", 50))
    assert fp32[:10].mean() > fp32[-10:].mean() + 0.2  # it learns: the curves are worth comparing
    rel = np.abs(bf16 - fp32) / fp32
    print(f"bf16 vs fp32 loss: max rel {rel.max():.5f}, mean rel {rel.mean():.5f}, 4u {4 * U}")
    assert rel.max() <= 4 * U, (rel.max(), int(rel.argmax()))
    assert abs(bf16.mean() - fp32.mean()) / fp32.mean() <= U
    assert not np.array_equal(bf16, fp32)  # bf16 really ran


# --- embeddings of the parity fixture ----------------------------------------------------------


def test_bf16_embedding_ranks_neighbours_like_fp32(tmp_path):
    """The fixture's four real ECGs, each seen through five lead sets (20 embeddings): every
    query's neighbour order under bf16 equals fp32's wherever fp32 separates two neighbours by
    more than 4u in cosine (closer pairs are ties at bf16's resolution); top-1 always agrees."""
    from ecgplat.leads import lead_mask, parse_leads
    from training.models import load_encoder
    from training.models.fairseq_import import import_fairseq_checkpoint
    from training.models.identifier import unit_embedding

    encoder = load_encoder(import_fairseq_checkpoint(FIX / "w2v_cmsc_rlm_tiny.pt", tmp_path / "c"))
    x = torch.from_numpy(np.load(FIX / "w2v_cmsc_rlm_tiny_reference.npz")["input"])
    views = []
    for spec in ("12", "I,II", "I,II,III,aVR,aVL,aVF", "V1,V2,V3,V4,V5,V6", "II,V5"):
        m = torch.from_numpy(lead_mask(parse_leads(spec)))
        views.append((x * m[None, :, None].to(x.dtype), m.expand(len(x), -1)))
    source = torch.cat([v[0] for v in views])
    mask = torch.cat([v[1] for v in views])

    def embed(precision):
        with torch.no_grad(), autocast(precision, "cpu"):
            return unit_embedding(encoder, source, mask)

    e32, e16 = embed("fp32"), embed("bf16")
    assert e16.dtype == torch.float32 and 0 < _rel(e16, e32) <= 4 * U
    s32, s16 = (e @ e.t() for e in (e32, e16))
    eye = torch.eye(len(s32), dtype=torch.bool)
    s32, s16 = s32.masked_fill(eye, -2.0), s16.masked_fill(eye, -2.0)
    checked = 0
    for i in range(len(s32)):
        order = torch.argsort(s32[i], descending=True)[:-1]  # self (-2) last, left out
        assert int(s16[i].argmax()) == int(order[0])
        for a, b in zip(order[:-1], order[1:], strict=True):
            if s32[i, a] - s32[i, b] > 4 * U:
                assert s16[i, a] > s16[i, b], (i, int(a), int(b))
                checked += 1
    assert checked >= len(s32) * 5  # most neighbour pairs are clearly ordered, so this tested


def test_embed_records_precision_in_lineage(tmp_path):
    """`embed_store` in fp32 and in bf16 over one store: the lineage says which, the embeddings
    agree to bf16's resolution, and the other precision under an existing name is refused
    without --overwrite (the set would silently mix precisions otherwise)."""
    from helpers import prepare_synthetic

    from retrieval.embed import embed_store
    from retrieval.features import FeatureError, load_features
    from training.models.fairseq_import import import_fairseq_checkpoint

    store = prepare_synthetic(tmp_path, 4, 1, seconds=10, valid=0.0, shard_splits=())["store"]
    ckpt = import_fairseq_checkpoint(FIX / "w2v_cmsc_rlm_tiny.pt", tmp_path / "c.pt")
    for p in ("fp32", "bf16"):
        assert embed_store(store, ckpt, p, precision=p)["lineage"]["precision"] == p
    a, b = (load_features(store, p, "segment") for p in ("fp32", "bf16"))
    assert a.lineage["precision"] == "fp32" and b.lineage["precision"] == "bf16"
    assert 0 < _rel(torch.from_numpy(b.embeddings), torch.from_numpy(a.embeddings)) <= 4 * U
    assert embed_store(store, ckpt, "fp32", precision="fp32")["status"] == "unchanged"
    with pytest.raises(FeatureError, match="in fp32"):
        embed_store(store, ckpt, "fp32", precision="bf16")
    assert embed_store(store, ckpt, "fp32", precision="bf16", overwrite=True)["status"] == "written"
