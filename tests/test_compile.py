"""`compile=auto|on|off` (training/compile.py): the auto policy, the compiled tiny model against
the eager one (inductor's C++ backend, forward and backward), the fall-back to eager with one
warning when compiling fails, and the run-config key."""

import warnings

import pytest
import torch

from training.compile import (
    AUTO_MIN_UPDATES,
    CompileFallback,
    compile_layers,
    decide,
    is_compiled,
    uncompile_layers,
)
from training.models import build_pretraining_model
from training.models.transformer import TransformerLayer


def _tiny(**over):
    torch.manual_seed(0)
    # no dropout: compiled dropout draws its own random numbers, so only p = 0 compares exactly
    return build_pretraining_model(
        "tiny", dropout=0.0, attention_dropout=0.0, dropout_input=0.0, dropout_features=0.0, **over
    ).train()


def _forward_backward(model, x, mask):
    """Masked-frame outputs and the encoder's parameter gradients of a fixed projection."""
    model.zero_grad(set_to_none=True)
    out = model(x, mask_indices=mask)
    loss = (out["x"].float() * torch.linspace(-1, 1, out["x"].numel()).view_as(out["x"])).sum()
    loss = loss + out["frames"].float().square().mean()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.encoder.named_parameters() if p.grad is not None}
    return out["x"].detach(), out["frames"].detach(), grads


class _Wide(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.layer = TransformerLayer(width, 4 * width, 8, 0.1, 0.1, 0.0, 1e-5)


def test_auto_compiles_only_where_it_was_measured_faster_and_pays_back(monkeypatch):
    import training.compile as tc

    tiny, wide = _tiny(), _Wide(768)
    assert not tc.AUTO_WHERE  # nowhere measured faster at no memory cost yet
    assert not decide("auto", wide, "cpu", "bf16", None)
    monkeypatch.setattr(tc, "AUTO_WHERE", frozenset({("cpu", "bf16")}))
    assert not decide("auto", tiny, "cpu", "bf16", None)  # tiny: the compile never pays back
    assert decide("auto", wide, "cpu", "bf16", None)  # no update limit: a long run
    assert decide("auto", wide, "cpu", "bf16", AUTO_MIN_UPDATES)
    assert not decide("auto", wide, "cpu", "bf16", AUTO_MIN_UPDATES - 1)  # short: eager
    assert not decide("auto", wide, "cpu", "fp32", None)  # not in AUTO_WHERE
    assert not decide("auto", wide, "cuda", "bf16", None)
    assert decide("on", tiny, "cpu", "fp32", 1) and not decide("off", wide, "cpu", "bf16", None)
    with pytest.raises(ValueError, match="unknown compile choice 'yes'"):
        decide("yes", tiny, "cpu", "bf16", None)


@pytest.fixture(scope="module")
def eager_and_compiled():
    """The tiny model's outputs and gradients, eager and compiled (inductor, C++), same input."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 12, 2500, generator=g)
    mask = torch.zeros(4, 156, dtype=torch.bool)
    mask[:, 10:60] = True
    model = _tiny()
    eager = _forward_backward(model, x, mask)
    assert compile_layers(model) == 2  # the tiny preset's two layers, one shared graph
    compiled = _forward_backward(model, x, mask)
    return model, eager, compiled


def test_compiled_layers_match_eager_forward_and_backward(eager_and_compiled):
    model, (x_e, f_e, g_e), (x_c, f_c, g_c) = eager_and_compiled
    assert is_compiled(model)  # it really ran compiled, not fallen back
    # fp32, the same ops fused and reordered: rounding-level differences (≈1e-6 of the norm)
    torch.testing.assert_close(x_c, x_e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f_c, f_e, rtol=1e-4, atol=1e-5)
    assert g_c.keys() == g_e.keys()
    # relative to each gradient's norm, floored at 1e-3 of the median norm: the key bias's
    # gradient is exactly zero in exact arithmetic (softmax ignores a per-row constant), so
    # both runs hold only rounding noise there
    floor = 1e-3 * torch.stack([g.norm() for g in g_e.values()]).median()
    for k in g_e:
        rel = float((g_c[k] - g_e[k]).norm() / torch.maximum(g_e[k].norm(), floor))
        assert rel < 1e-4, (k, rel)
    uncompile_layers(model)
    assert not is_compiled(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert set(model.state_dict()) == set(_tiny().state_dict())  # checkpoints keep their keys


def test_a_failing_compile_falls_back_to_eager_with_one_warning():
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler here")

    import training.compile as tc

    tc._warned = False
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, 2500, generator=g)
    mask = torch.zeros(2, 156, dtype=torch.bool)
    mask[:, 5:40] = True
    model = _tiny()
    ref = _forward_backward(model, x, mask)
    compile_layers(model, backend=broken_backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _forward_backward(model, x, mask)
        _forward_backward(model, x, mask)
    fallbacks = [w for w in caught if issubclass(w.category, CompileFallback)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    assert "no C++ compiler here" in str(fallbacks[0].message)
    assert not is_compiled(model)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)  # the eager path, bit for bit
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], rtol=0, atol=0)


def test_an_error_of_the_model_itself_is_not_swallowed():
    model = _tiny()
    compile_layers(model, backend="eager")
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(2, 5, 2500))  # wrong lead count: eager raises it too
    wide = torch.randn(2, 156, 64)
    layer = next(m for m in model.modules() if isinstance(m, TransformerLayer))
    with pytest.raises(RuntimeError):
        layer(wide[..., :32])  # a shape error inside the compiled layer propagates
    assert is_compiled(model)  # and did not count as a compile failure


def test_run_config_compile_key():
    from training.run_config import ConfigError, RunConfig, load_config

    assert RunConfig().compile == "auto"
    assert load_config(None, ["compile=off"]).compile == "off"
    with pytest.raises(ConfigError, match="compile"):
        load_config(None, ["compile=maybe"])


def test_a_compiled_run_trains_and_writes_the_usual_checkpoint(
    synth_shards, tmp_path, eager_and_compiled
):
    """`compile=on` through the loop (the layers' graph compiled by the fixture is reused: same
    layer configuration, fp32): the run trains and its checkpoint loads into an eager model."""
    from training.loop import train
    from training.models.checkpoint_file import load_checkpoint
    from training.run_config import load_config
    from training.tasks.pretrain import PretrainTask

    cfg = load_config(
        "w2v_cmsc_rlm",
        [
            f"data.shards={synth_shards}",
            f"out={tmp_path / 'run'}",
            "model.preset=tiny",
            *(f"model.{k}=0" for k in ("dropout", "attention_dropout", "dropout_input")),
            "model.dropout_features=0",
            "data.batch_size=2",
            "data.num_workers=0",
            "precision=fp32",
            "compile=on",
            "optim.max_update=3",
            "logging.wandb_mode=disabled",
        ],
    )
    import training.compile as tc

    tc._warned = False  # a fall-back would warn again (and fail the test)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallback)
        summary = train(cfg, PretrainTask(cfg))
    assert summary["num_updates"] == 3
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")
    eager = PretrainTask(cfg).build_model()
    eager.load_state_dict(ckpt["model"], strict=True)  # the usual keys, no compile wrapper
