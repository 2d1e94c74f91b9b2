"""Typed run configs: presets, override parsing, unknown keys; the `ecgplat train` CLI checks."""

import pytest
import yaml
from typer.testing import CliRunner

from training.run_config import ConfigError, RunConfig, load_config, preset_names, valid_keys


def test_pretraining_presets_mirror_the_original():
    for name in ("w2v_cmsc_rlm", "w2v_cmsc", "w2v", "cmsc"):
        assert name in preset_names()
    c = load_config("w2v_cmsc_rlm")
    assert (c.task, c.model.preset) == ("pretrain", "paper")
    assert c.optim.lr == 5e-5 and c.optim.betas == [0.9, 0.98] and c.optim.eps == 1e-6
    assert c.optim.weight_decay == 0.01 and c.optim.schedule == "fixed"
    assert (c.data.batch_size, c.optim.update_freq, c.optim.max_epoch) == (64, 2, 200)
    assert c.criterion.loss_weights == [0.1, 10.0]
    assert (c.criterion.w2v, c.criterion.cmsc, c.data.rlm, c.data.rlm_prob) == (
        True,
        True,
        True,
        0.5,
    )
    assert c.optim.clip_norm == 0.0 and c.seed == 1
    wc = load_config("w2v_cmsc")
    assert (wc.data.rlm, wc.criterion.cmsc) == (False, True)
    assert (load_config("w2v").criterion.cmsc, load_config("w2v").criterion.w2v) == (False, True)
    assert load_config("cmsc").criterion.w2v is False


def test_typed_overrides():
    c = load_config(
        "w2v_cmsc_rlm",
        [
            "seed=7",
            "optim.max_update=1e3",
            "optim.lr=3e-4",
            "data.rlm=no",
            "checkpoint.maximize=True",
            "optim.betas=[0.8, 0.95]",
            "criterion.loss_weights=0.5,2",
            "data.store=none",
            "data.epoch_batches=12",
            "model.dropout=0",
            "data.leads=I,II,V2",
            "finetune.init=none",
        ],
    )
    assert c.seed == 7 and isinstance(c.seed, int)
    assert c.optim.max_update == 1000 and isinstance(c.optim.max_update, int)
    assert c.optim.lr == 3e-4 and isinstance(c.optim.lr, float)
    assert c.data.rlm is False and c.checkpoint.maximize is True
    assert c.optim.betas == [0.8, 0.95] and c.criterion.loss_weights == [0.5, 2.0]
    assert c.data.store is None and c.data.epoch_batches == 12
    assert c.model.dropout == 0.0 and isinstance(c.model.dropout, float)
    assert c.data.leads == "I,II,V2" and c.finetune.init == "none"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("seed=abc", "'seed' expects an int"),
        ("optim.max_update=2.5", "'optim.max_update' expects an int"),
        ("data.rlm=maybe", "'data.rlm' expects a bool"),
        ("optim.lr=fast", "'optim.lr' expects a float"),
        ("optim.schedule=linear", "optim.schedule: 'linear' is not one of"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
        ("data.batch_size=0", "data.batch_size: must be >= 1"),
        ("seed", "is not of the form key=value"),
    ],
)
def test_bad_override_values_are_rejected(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config("w2v", [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_keys_are_rejected_with_the_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config("w2v", ["optim.lrr=1e-4"])
    msg = str(e.value)
    assert "'optim.lrr'" in msg and "optim.lr," in msg and "checkpoint.patience" in msg
    with pytest.raises(ConfigError, match="'model'"):
        load_config(None, ["model=paper"])  # a section is not a leaf
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1.0e-4\n  warmup: 10\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'optim\.warmup'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown config preset 'nope'"):
        load_config("nope")


def test_yaml_round_trip(tmp_path):
    c = load_config("cmsc", ["optim.lr=1e-3", "data.rlm_condition=[2,3]", "out=/tmp/x"])
    c.save_yaml(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == c.to_dict()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 1e-3
    assert RunConfig.from_dict(c.to_dict()) == c
    assert len(valid_keys()) == len(set(valid_keys())) > 50


def test_train_cli_rejects_misuse(tmp_path):
    from ecgplat.cli import app

    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "train",
            "pretrain",
            "--shards",
            str(tmp_path),
            "--out",
            str(tmp_path / "run"),
            "optim.lrr=1",
        ],
    )
    assert r.exit_code == 2 and "unknown config key 'optim.lrr'" in r.output
    r = runner.invoke(
        app, ["train", "finetuning", "--shards", str(tmp_path), "--out", str(tmp_path / "run")]
    )
    assert r.exit_code == 2 and "unknown task 'finetuning'" in r.output
    r = runner.invoke(app, ["train", "pretrain", "--out", str(tmp_path / "run2"), "--resume"])
    assert r.exit_code == 2 and "nothing" not in r.output and "to resume from" in r.output
    assert not (tmp_path / "run").exists()  # nothing written for a rejected command


def test_every_task_has_a_builder_and_a_default_preset():
    from training.tasks import DEFAULT_PRESET, TASKS

    assert list(TASKS) == list(DEFAULT_PRESET) == ["pretrain", "diagnosis", "finetune", "identify"]
    for name in ("pretrain", "diagnosis", "finetune"):  # identify reads its shards on construction
        cfg = load_config(DEFAULT_PRESET[name])
        assert TASKS[name](cfg).name == name


def test_resolve_run_config_builds_a_new_run_and_refuses_bad_resumes(tmp_path):
    from training.launch import resolve_run_config

    shards = tmp_path / "shards"
    shards.mkdir()
    paths = dict(shards=str(shards), init=None, leads="6", store=None)
    cfg = resolve_run_config(
        "diagnosis", None, ["optim.lr=1e-4"], out=tmp_path / "run", resume=False, **paths
    )
    assert (cfg.task, cfg.data.leads, cfg.optim.lr) == ("diagnosis", "6", 1e-4)
    assert cfg.out == str(tmp_path / "run") and cfg.data.shards == str(shards)
    with pytest.raises(ConfigError, match="to resume from"):
        resolve_run_config("diagnosis", None, [], out=tmp_path / "run", resume=True, **paths)
