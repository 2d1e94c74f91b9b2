"""Contracts of the encoder, pretraining model, quantizer, masking, checkpoints (every preset)."""

import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.models import (
    CheckpointError,
    EncoderConfig,
    build_encoder,
    build_pretraining_model,
    count_parameters,
    get_config,
    list_presets,
    load_checkpoint,
    load_encoder,
    save_checkpoint,
)
from training.models.masking import compute_mask_indices
from training.models.quantizer import GumbelVectorQuantizer

torch.set_num_threads(1)
# Every registered preset, the way timm tests every model: a new preset gets every contract.
PRESETS = list_presets()


def _ecg(batch, samples=2500, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 12, samples, generator=g) * 0.3


def _paper_counts(layers):
    """Hand count of the paper architecture (docs/method.md §2.1), independent of the modules."""
    D, F_, C, V, G, fd = 768, 3072, 256, 320, 2, 256
    conv = 12 * C * 2 + 3 * C * C * 2 + 2 * C  # convs (no bias) + GroupNorm
    post = 2 * C + (C * D + D) + D  # LayerNorm(256), proj, mask_emb
    posconv = D * (D // 16) * 128 + 128 + D  # v, g (per kernel position), bias
    layer = 4 * (D * D + D) + (D * F_ + F_) + (F_ * D + D) + 2 * 2 * D
    encoder = conv + post + posconv + layers * layer + 2 * D
    heads = G * V * (fd // G) + (C * G * V + G * V) + (fd * fd + fd) + (D * fd + fd)
    return encoder, heads


@pytest.fixture(scope="module", params=PRESETS)
def preset_model(request):
    """(preset, pretraining model), built once per preset for the contract tests below: filling
    paper's 90M initial weights takes seconds, and pytest keeps one preset alive at a time."""
    torch.manual_seed(1)
    return request.param, build_pretraining_model(request.param)


def test_forward_shapes(preset_model):
    preset, model = preset_model
    torch.manual_seed(0)
    cfg = get_config(preset)
    enc = model.encoder.eval()
    assert enc.output_length(2500) == 156
    # big presets: 0.8 s of input (T' = 50) keeps every shape contract and the forward cheap
    batch, samples = (3, 2500) if preset == "tiny" else (1, 800)
    frames = enc.output_length(samples)
    with torch.no_grad():
        out = enc(_ecg(batch, samples))
    assert out.frames.shape == (batch, frames, cfg.encoder_embed_dim)
    assert out.pooled.shape == (batch, cfg.encoder_embed_dim)
    assert out.local_features.shape == (batch, frames, cfg.conv_dim)
    assert out.features_pen.shape == () and out.features_pen.dtype == torch.float32
    assert out.mask_indices is None
    # a mean of <= 156 frames (|x| ~ 1) in another order: ~sqrt(156)*eps, in assert_close's
    # fp32 default (rtol 1.3e-6, atol 1e-5)
    torch.testing.assert_close(out.pooled, out.frames.mean(1))
    assert torch.isfinite(out.frames).all()


def test_parameter_counts():
    for preset, layers in (("paper", 12), ("small", 8)):
        with torch.device("meta"):  # counts only: no init cost
            model = build_pretraining_model(preset)
        enc, heads = (
            count_parameters(model.encoder),
            count_parameters(model) - count_parameters(model.encoder),
        )
        assert (enc, heads) == _paper_counts(layers)
    enc, heads = _paper_counts(12)
    assert abs(enc - 90.37e6) / 90.37e6 < 0.005 and abs(heads - 0.51e6) / 0.51e6 < 0.005
    tiny = build_pretraining_model("tiny")
    assert count_parameters(tiny.encoder) < 1_000_000


def _pretrain_loss(out):
    c, q = F.normalize(out["x"], dim=-1), F.normalize(out["y"], dim=-1)
    return (
        -(c * q).sum(-1).mean()
        + 0.1 * (out["num_vars"] - out["prob_perplexity"]) / out["num_vars"]
        + 10 * out["features_pen"]
        + out["pooled"].pow(2).mean()
    )


def test_pretraining_backward_every_parameter(preset_model):
    preset, model = preset_model
    torch.manual_seed(1)
    model.train().zero_grad(set_to_none=True)
    batch, samples = (4, 2500) if preset == "tiny" else (1, 800)  # big presets: T' = 50, cheap
    out = model(_ecg(batch, samples))
    n_frames = model.encoder.output_length(samples)
    m = int(out["mask_indices"][0].sum())
    assert out["mask_indices"].shape == (batch, n_frames)
    assert (out["mask_indices"].sum(1) == m).all() and m > 0
    assert out["x"].shape == out["y"].shape == (batch, m, model.cfg.final_dim)
    assert out["frames"].shape == (batch, n_frames, model.cfg.encoder_embed_dim)
    assert out["num_vars"] == 640 and out["temp"] == 2.0
    _pretrain_loss(out).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_pretraining_outputs_match_manual_composition():
    """Eval mode: x / y are final_proj / project_q∘quantizer of the masked frames."""
    torch.manual_seed(2)
    model = build_pretraining_model("tiny").eval()
    x = _ecg(3)
    mask = torch.from_numpy(
        compute_mask_indices((3, 156), None, 0.65, 10, 2, rng=np.random.default_rng(0))
    )
    with torch.no_grad():
        out = model(x, mask_indices=mask)
        enc = model.encoder.extract_features(x, mask_indices=mask)
        unmasked = model.encoder.extract_features(x)
        q = model.quantizer(unmasked.local_features)["x"]
    m = int(mask[0].sum())
    # the same fp32 ops on other shapes (a GEMM may block them differently): a few eps of |x| ~ 1,
    # in assert_close's fp32 default (rtol 1.3e-6, atol 1e-5)
    torch.testing.assert_close(out["frames"], enc.frames)
    torch.testing.assert_close(out["x"], model.final_proj(enc.frames[mask].view(3, m, -1)))
    torch.testing.assert_close(out["y"], model.project_q(q[mask].view(3, m, -1)))
    # masking changes the context but never the targets' input (local features)
    torch.testing.assert_close(enc.local_features, unmasked.local_features)
    assert not torch.allclose(enc.frames, unmasked.frames)


def test_lead_mask_zeroes_leads_and_padding_pools_valid_frames():
    torch.manual_seed(3)
    enc = build_encoder("tiny").eval()
    x = _ecg(2)
    keep = torch.zeros(2, 12, dtype=torch.bool)
    keep[:, [0, 1, 7]] = True
    zeroed = x * keep[:, :, None]
    with torch.no_grad():
        a, b = enc(x, lead_mask=keep), enc(zeroed)
        torch.testing.assert_close(a.frames, b.frames)
        pad = torch.zeros(2, 2500, dtype=torch.bool)
        pad[1, 1600:] = True  # row 1: 1600 valid samples = 100 frames
        p = enc(x, padding_mask=pad)
    torch.testing.assert_close(p.pooled[1], p.frames[1, :100].mean(0))
    torch.testing.assert_close(p.pooled[0], p.frames[0].mean(0))


def test_masking_statistics():
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(40):
        m = compute_mask_indices((128, 156), None, 0.65, 10, min_masks=2, rng=rng)
        per_row = m.sum(1)
        assert (per_row == per_row[0]).all()
        counts.append(per_row[0])
    mean = float(np.mean(counts))
    assert 50 <= mean <= 60, mean  # spec: M ~ 55 of 156 for 128 rows
    assert 0.3 <= mean / 156 <= 0.4
    assert min(counts) >= 40 and max(counts) <= 70
    # a single row keeps whole spans: the count is a union of 10 or 11 length-10 spans
    single = compute_mask_indices((1, 156), None, 0.65, 10, min_masks=2, rng=rng)[0]
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, single.astype(int), 0])))[::2]
    assert (runs >= 10).all()
    # padded frames are never masked; min_masks applies to short rows
    pad = np.zeros((4, 156), dtype=bool)
    pad[2, 60:] = True
    m = compute_mask_indices((4, 156), pad, 0.65, 10, min_masks=2, rng=rng)
    assert not (m & pad).any() and (m.sum(1) == m.sum(1)[0]).all()


def test_masking_follows_torch_seed():
    torch.manual_seed(7)
    a = compute_mask_indices((8, 156), None, 0.65, 10, 2)
    torch.manual_seed(7)
    b = compute_mask_indices((8, 156), None, 0.65, 10, 2)
    assert (a == b).all()


def test_quantizer_temperature_schedule():
    q = GumbelVectorQuantizer(16, 8, 2, 8, temp=(2.0, 0.5, 0.999995))
    assert q.temperature(0) == 2.0
    assert q.temperature(1000) == pytest.approx(2 * math.exp(1000 * math.log(0.999995)), rel=1e-12)
    assert q.temperature(1000) == pytest.approx(1.990025, abs=1e-6)
    assert q.temperature(277_000) == pytest.approx(0.50064, abs=1e-4)  # just above the floor
    assert q.temperature(300_000) == 0.5
    model = build_pretraining_model("tiny")
    model.set_num_updates(1000)
    assert model.quantizer.curr_temp == q.temperature(1000)


def test_quantizer_eval_matches_numpy_and_train_is_straight_through():
    torch.manual_seed(4)
    q = GumbelVectorQuantizer(24, num_vars=10, groups=2, vq_dim=8).eval()
    x = torch.randn(3, 7, 24)
    with torch.no_grad():
        out = q(x, produce_targets=True)
    logits = (
        x.reshape(-1, 24).numpy() @ q.weight_proj.weight.detach().numpy().T
        + q.weight_proj.bias.detach().numpy()
    ).reshape(-1, 2, 10)
    codes = logits.argmax(-1)
    # argmaxes agree exactly on any CPU while every top-2 gap exceeds the 24-term dots' round-off
    top2 = np.sort(logits, -1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0] > 1e-4).all()
    assert (out["targets"].reshape(-1, 2).numpy() == codes).all()
    book = q.vars.detach().numpy().reshape(2, 10, 4)
    expect = np.concatenate([book[0][codes[:, 0]], book[1][codes[:, 1]]], axis=1).reshape(3, 7, 8)
    np.testing.assert_allclose(out["x"].numpy(), expect, rtol=0, atol=1e-6)  # copied codewords

    def ent(p):
        return np.exp(-(p * np.log(p + 1e-7)).sum(-1)).sum()

    hard = np.stack([np.eye(10)[codes[:, g]] for g in range(2)], 1).mean(0)
    soft = np.exp(logits - logits.max(-1, keepdims=True))
    soft = (soft / soft.sum(-1, keepdims=True)).mean(0)
    # fp32 softmax and entropy over 42 rows x 10 codes vs float64: ~100 eps, rel 1e-5
    assert float(out["code_perplexity"]) == pytest.approx(ent(hard), rel=1e-5)
    assert float(out["prob_perplexity"]) == pytest.approx(ent(soft), rel=1e-5)
    q.train()
    xt = x.clone().requires_grad_(True)
    res = q(xt)
    rows = res["x"].detach().reshape(-1, 2, 4)
    for g in range(2):  # every row is (numerically) a codeword
        d = torch.cdist(rows[:, g], q.vars.detach()[0, g * 10 : (g + 1) * 10]).min(1).values
        assert (d < 1e-5).all()
    res["x"].sum().backward()
    assert xt.grad.abs().sum() > 0 and q.weight_proj.weight.grad.abs().sum() > 0


def test_feature_grad_mult_scales_and_freezes_cnn():
    x = _ecg(2)
    mask = torch.from_numpy(
        compute_mask_indices((2, 156), None, 0.65, 10, 2, rng=np.random.default_rng(1))
    )
    grads = {}
    for mult in (1.0, 0.1, 0.0):
        torch.manual_seed(5)
        model = build_pretraining_model("tiny", feature_grad_mult=mult).eval()
        _pretrain_loss(model(x, mask_indices=mask)).backward()
        conv = model.encoder.feature_extractor.conv_layers[1][0].weight
        grads[mult] = None if conv.grad is None else conv.grad.clone()
        assert model.encoder.post_extract_proj.weight.grad.abs().sum() > 0
    assert grads[0.0] is None
    torch.testing.assert_close(grads[0.1], 0.1 * grads[1.0], rtol=1e-4, atol=1e-9)


def test_checkpoint_roundtrip_load_encoder_and_faults(tmp_path):
    torch.manual_seed(10)
    model = build_pretraining_model("tiny")
    path = save_checkpoint(
        tmp_path / "pre.pt",
        kind="pretrain",
        encoder_config=model.cfg,
        model=model.state_dict(),
        config={"run": "t"},
        num_updates=3,
    )
    enc = load_encoder(path)
    assert not enc.training and enc.cfg == model.cfg
    x = _ecg(2)
    with torch.no_grad():
        a, b = model.encoder.eval()(x), enc(x)
    for t1, t2 in zip(a[:4], b[:4], strict=True):
        assert torch.equal(t1, t2)
    from training import load_encoder as lazy_load_encoder

    assert lazy_load_encoder is load_encoder
    ft = load_encoder(path, dropout=0.0, feature_grad_mult=0.0)
    assert ft.cfg.dropout == 0.0 and ft.feature_grad_mult == 0.0
    with pytest.raises(CheckpointError, match="unknown EncoderConfig option"):
        load_encoder(path, not_an_option=1)
    # fault injection: an unserialisable value leaves the existing checkpoint intact
    before = path.read_bytes()
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        save_checkpoint(
            path,
            kind="pretrain",
            encoder_config=model.cfg,
            model=model.state_dict(),
            extra={"bad": lambda: 0},
        )
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pre.pt"]
    assert load_checkpoint(path)["num_updates"] == 3
    broken = tmp_path / "broken.pt"
    broken.write_bytes(before[: len(before) // 2])
    with pytest.raises(CheckpointError, match="broken.pt: not a loadable"):
        load_encoder(broken)
    torch.save({"cfg": {}, "model": {}}, tmp_path / "fs.pt")
    with pytest.raises(CheckpointError, match="fairseq-signals"):
        load_checkpoint(tmp_path / "fs.pt")
    wrong = tmp_path / "wrong.pt"
    save_checkpoint(
        wrong,
        kind="pretrain",
        encoder_config=get_config("tiny", encoder_embed_dim=32),
        model=model.state_dict(),
    )
    with pytest.raises(CheckpointError, match="wrong.pt: encoder weights do not fit"):
        load_encoder(wrong)


def test_config_validation_and_presets():
    assert {"paper", "small", "tiny"} <= set(PRESETS) and len(set(PRESETS)) == len(PRESETS)
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        get_config("huge")
    with pytest.raises(ValueError, match="conv_feature_layers"):
        EncoderConfig(conv_feature_layers="__import__('os')")
    assert EncoderConfig(conv_feature_layers="[(512, 10, 5)] + [(512, 3, 2)] * 2").conv_layers == [
        (512, 10, 5),
        (512, 3, 2),
        (512, 3, 2),
    ]
    cfg = get_config("paper", dropout=0.0)
    assert EncoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_models_cli_json():
    from typer.testing import CliRunner

    from ecgplat.cli import app
    from training.models import preset_summary

    res = CliRunner().invoke(app, ["models", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["name"] for r in rows] == PRESETS
    paper = rows[PRESETS.index("paper")]
    assert (paper["encoder_params"], paper["pretraining_head_params"]) == _paper_counts(12)
    assert rows == [preset_summary(n) for n in PRESETS]
    assert CliRunner().invoke(app, ["models"]).exit_code == 0
