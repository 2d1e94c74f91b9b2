"""Import of a real fairseq-signals checkpoint: numerical parity with that implementation's outputs.

Fixtures (tests/fixtures/fairseq_signals/, see its README): a `wav2vec2_cmsc` checkpoint written
by fairseq-signals after 12 updates, and what fairseq-signals computed from it in eval mode.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from training.models import W2VCMSCModel, load_checkpoint, load_encoder
from training.models.fairseq_import import import_fairseq_checkpoint, map_fairseq_state_dict

torch.set_num_threads(1)
FIX = Path(__file__).parent / "fixtures" / "fairseq_signals"
CKPT = FIX / "w2v_cmsc_rlm_tiny.pt"
EPS32 = float(np.finfo(np.float32).eps)
# The longest reduction in the model: 256 conv channels x kernel 2, and conv_pos 4 channels x 128.
TERMS = 512
# Reductions in sequence from the input to each output (conv layers, norms, projections,
# attention and FFN matmuls); bounds the accumulated round-off below.
DEPTH = {
    "conv_features": 4,
    "features_pen": 5,
    "layer_norm_features": 5,
    "encoder_out": 15,
    "pooled": 16,
    "final_proj": 16,
    "quantized": 1,
    "project_q": 1,
}


def assert_fp32_close(got, want, name: str) -> None:
    """fp32 parity up to round-off: another CPU's kernels reorder every sum, and the independent
    roundings of DEPTH x TERMS additions add like a random walk, ~sqrt(DEPTH*TERMS)*eps relative
    to the tensor's largest values (the size of the summands; small outputs are cancellations)."""
    tol = np.sqrt(DEPTH[name] * TERMS) * EPS32
    want = np.asarray(want)
    atol = tol * float(np.abs(want).max())
    np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=atol, err_msg=name)


@pytest.fixture(scope="module")
def fairseq():
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=True)
    return ckpt["model"], ckpt["cfg"]["model"]


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIX / "w2v_cmsc_rlm_tiny_reference.npz"))


def _outputs(model: W2VCMSCModel, x: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        enc = model.encoder.extract_features(x)
        q = model.quantizer(enc.local_features, produce_targets=True)
        return {
            "conv_features": model.encoder.feature_extractor(x),
            "features_pen": enc.features_pen,
            "layer_norm_features": enc.local_features,
            "encoder_out": enc.frames,
            "pooled": enc.pooled,
            "final_proj": model.final_proj(enc.frames),
            "quantizer_codes": q["targets"],
            "quantized": q["x"],
            "project_q": model.project_q(q["x"]),
        }


def _model(state, model_cfg, **kw):
    cfg, mapped = map_fairseq_state_dict(state, model_cfg, **kw)
    model = W2VCMSCModel(cfg)
    model.load_state_dict(mapped, strict=True)
    return model


def test_config_from_checkpoint(fairseq):
    state, model_cfg = fairseq
    cfg, _ = map_fairseq_state_dict(state, model_cfg)
    assert (
        cfg.encoder_embed_dim,
        cfg.encoder_layers,
        cfg.encoder_attention_heads,
        cfg.encoder_ffn_embed_dim,
        cfg.final_dim,
    ) == (64, 2, 4, 128, 32)
    assert (cfg.latent_vars, cfg.latent_groups, cfg.conv_dim, cfg.layer_norm_eps) == (
        320,
        2,
        256,
        1e-5,
    )
    assert cfg.latent_temp == (2.0, 0.5, 0.999995) and cfg.feature_grad_mult == 0.1
    paper_era = dict(model_cfg, _name="wav2vec2_clocs")
    assert map_fairseq_state_dict(state, paper_era)[0].layer_norm_eps == 1e-6


def test_parity_with_fairseq_signals(fairseq, reference):
    model = _model(*fairseq)
    out = _outputs(model, torch.from_numpy(reference["input"]))
    assert set(out) == set(reference) - {"input"}
    # codes are argmaxes: exact on any CPU while every top-2 logit gap (min 3.3e-3) exceeds the
    # logits' round-off (depth 6, the bound of assert_fp32_close, ~5e-4 at |logit| 71)
    with torch.no_grad():
        logits = model.quantizer.weight_proj(out["layer_norm_features"])
    top2 = logits.view(*logits.shape[:2], 2, -1).topk(2, dim=-1).values
    bound = np.sqrt(6 * TERMS) * EPS32 * float(logits.abs().max())
    assert float((top2[..., 0] - top2[..., 1]).min()) > 2 * bound
    assert (out["quantizer_codes"].numpy() == reference["quantizer_codes"]).all()
    for name, value in out.items():
        if name != "quantizer_codes":
            assert_fp32_close(value.numpy(), reference[name], name)
    # the 4th input has zeroed leads: the same result comes from lead_mask on the full signal
    x = torch.from_numpy(reference["input"])
    keep = x.abs().sum(-1) > 0
    assert (~keep[3]).sum() == 6 and keep[:3].all()
    with torch.no_grad():
        lm = model.encoder.extract_features(x, lead_mask=keep).frames
    assert_fp32_close(lm.numpy(), reference["encoder_out"], "encoder_out")


def test_wrong_layer_norm_eps_is_detected(fairseq, reference):
    """The reference tells eps 1e-5 from the PAPER-ERA 1e-6, whatever the CPU: along the
    direction in which the eps moves `encoder_out`, the right eps's error is round-off (random
    directions put ~1/sqrt(N) of their norm there) and the wrong eps's error is the whole shift."""
    x = torch.from_numpy(reference["input"])
    want = reference["encoder_out"].astype(np.float64).ravel()
    right = _outputs(_model(*fairseq), x)["encoder_out"].numpy().ravel() - want
    wrong = _outputs(_model(*fairseq, layer_norm_eps=1e-6), x)["encoder_out"].numpy().ravel() - want
    shift = (wrong - right) / np.linalg.norm(wrong - right)
    # measured ~2500x on AVX512, AVX2 and default kernels; 100x leaves room for other CPUs
    assert abs(wrong @ shift) > 100 * abs(right @ shift)


def test_unknown_and_missing_keys_are_named(fairseq):
    state, model_cfg = fairseq
    extra = dict(state, **{"encoder.layers.0.adapter.weight": torch.zeros(3)})
    with pytest.raises(
        ValueError, match=r"unknown fairseq-signals key\(s\): encoder\.layers\.0\.adapter\.weight"
    ):
        map_fairseq_state_dict(extra, model_cfg)
    missing = {k: v for k, v in state.items() if k != "encoder.layers.1.fc2.bias"}
    with pytest.raises(
        ValueError, match=r"missing weight\(s\).*encoder\.transformer\.layers\.1\.fc2\.bias"
    ):
        map_fairseq_state_dict(missing, model_cfg)
    with pytest.raises(ValueError, match="shape mismatch.*encoder.mask_emb"):
        map_fairseq_state_dict(
            state, dict(model_cfg, encoder_embed_dim=128, encoder_attention_heads=4)
        )
    with pytest.raises(ValueError, match="target_glu=True is not supported"):
        map_fairseq_state_dict(state, dict(model_cfg, target_glu=True))


def test_weight_g_weight_v_layout_imports_identically(fairseq):
    state, model_cfg = fairseq
    _, new = map_fairseq_state_dict(state, model_cfg)
    old = {}
    for k, v in state.items():  # older torch + PAPER-ERA layout: posconv inside the encoder
        k = k.replace("conv_pos.pos_conv.0.", "encoder.pos_conv.0.")
        k = k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        )
        old[k] = v
    assert "encoder.pos_conv.0.weight_g" in old and "encoder.pos_conv.0.weight_v" in old
    _, mapped = map_fairseq_state_dict(old, model_cfg)
    assert mapped.keys() == new.keys()
    for k in new:
        assert torch.equal(mapped[k], new[k]), k
    both = dict(
        state,
        **{
            "conv_pos.pos_conv.0.weight_g": state[
                "conv_pos.pos_conv.0.parametrizations.weight.original0"
            ]
        },
    )
    with pytest.raises(ValueError, match="map twice"):
        map_fairseq_state_dict(both, model_cfg)


def test_imported_checkpoint_loads_for_encoder_and_heads(tmp_path, reference):
    out = import_fairseq_checkpoint(CKPT, tmp_path / "imported.pt")
    ckpt = load_checkpoint(out)
    assert ckpt["kind"] == "imported" and ckpt["config"]["source"] == "fairseq-signals"
    enc = load_encoder(out)
    assert not enc.training
    x = torch.from_numpy(reference["input"])
    with torch.no_grad():
        res = enc(x)
    assert_fp32_close(res.frames.numpy(), reference["encoder_out"], "encoder_out")
    assert_fp32_close(res.pooled.numpy(), reference["pooled"], "pooled")
    from training.models.encoder_config import EncoderConfig

    full = W2VCMSCModel(EncoderConfig.from_dict(ckpt["encoder_config"]))
    full.load_state_dict(ckpt["model"], strict=True)
    assert_fp32_close(_outputs(full, x)["project_q"].numpy(), reference["project_q"], "project_q")


def test_import_cli(tmp_path):
    from ecgplat.cli import app

    runner = CliRunner()
    out = tmp_path / "imp.pt"
    res = runner.invoke(app, ["import", "fairseq-signals", str(CKPT), str(out)])
    assert res.exit_code == 0, res.output
    assert "imported" in res.output and out.is_file()
    stamp = out.stat().st_mtime_ns
    res = runner.invoke(app, ["import", "fairseq-signals", str(CKPT), str(out)])
    assert res.exit_code != 0 and "already exists" in res.output and out.stat().st_mtime_ns == stamp
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    res = runner.invoke(app, ["import", "fairseq-signals", str(bogus), str(tmp_path / "x.pt")])
    assert res.exit_code != 0 and "bogus.pt: not a loadable torch checkpoint" in res.output
    assert not (tmp_path / "x.pt").exists()
