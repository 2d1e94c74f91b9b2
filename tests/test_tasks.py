"""User tasks end to end on real files: `labels add` from a table, a field and a vocabulary (checked
against independent readings of the sources), the task file's privacy and atomicity, forget,
then `train finetune` -> `evaluate task` -> `probe` with numbers recomputed by scikit-learn."""

from __future__ import annotations

import ast
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm
from typer.testing import CliRunner

from ecgplat.cli import app
from ecgplat.store import open_store
from ecgplat.store.task_store import TASKS_DIR, read_task

REPO = Path(__file__).parents[1]
PRETRAINED = REPO / "tests" / "fixtures" / "pretrained_tiny" / "w2v_cmsc_rlm_tiny_synth.pt"
runner = CliRunner()


def _ok(args: list[str]) -> str:
    r = runner.invoke(app, [str(a) for a in args], env={"ECGPLAT_DEBUG": "1"})
    assert r.exit_code == 0, r.output
    return r.stdout


@pytest.fixture(scope="module")
def store(synth_store, tmp_path_factory) -> Path:
    """A writable copy of the session's synthetic store (72 records, 24 patients, split)."""
    path = tmp_path_factory.mktemp("tasks") / "store"
    shutil.copytree(synth_store, path)
    return path


def test_table_field_and_list_round_trip(store, tmp_path):
    records = open_store(store).records
    # a table keyed by the path as ingested, with the file extension, for a made-up target
    ef = {r.path: 40.0 + (i % 7) * 2.5 for i, r in enumerate(records.itertuples())}
    table = pd.DataFrame({"file": [f"{p}.hea" for p in ef], "ef": list(ef.values())})
    table.to_csv(tmp_path / "echo.csv", index=False)
    out = _ok(
        [
            "labels",
            "add",
            store,
            "--name",
            "ef",
            "--table",
            tmp_path / "echo.csv",
            "--key",
            "file",
            "--target",
            "ef",
            "--json",
        ]
    )
    summary = json.loads(out)
    assert summary["kind"] == "regression" and summary["source"]["key_type"] == "path"
    task = read_task(open_store(store), "ef")
    got = dict(zip(records["path"].to_numpy()[task.record_index], task.target[:, 0], strict=True))
    assert got == pytest.approx(ef)
    # the task file holds record indices and targets, never the table's keys
    raw = (store / TASKS_DIR / "ef.npz").read_bytes()
    assert not any(p.encode() in raw for p in ef) and b"S0000" not in raw
    with np.load(store / TASKS_DIR / "ef.npz", allow_pickle=False) as data:
        assert sorted(data.files) == ["record_index", "spec", "target"]

    # a parquet keyed by store record key, multiclass
    keys = records["record_key"].tolist()
    grade = ["low", "mid", "high"]
    frame = pd.DataFrame({"k": keys, "grade": [grade[i % 3] for i in range(len(keys))]})
    frame.to_parquet(tmp_path / "grade.parquet")
    _ok(
        [
            "labels",
            "add",
            store,
            "--name",
            "grade",
            "--table",
            tmp_path / "grade.parquet",
            "--key",
            "k",
            "--target",
            "grade",
        ]
    )
    task = read_task(open_store(store), "grade")
    assert task.spec.kind == "multiclass" and task.spec.classes == ("high", "low", "mid")
    want = [sorted(grade).index(grade[i % 3]) for i in task.record_index]
    assert task.target[:, 0].tolist() == want

    _ok(["labels", "add", store, "--name", "sex", "--field", "sex"])
    _ok(["labels", "add", store, "--name", "age", "--field", "age"])
    sex = read_task(open_store(store), "sex")
    assert (
        sex.target[:, 0].tolist() == (records["sex"].to_numpy()[sex.record_index] == "F").tolist()
    )
    listed = {t["name"]: t for t in json.loads(_ok(["labels", "list", store, "--json"]))}
    assert list(listed) == ["diagnosis", "age", "ef", "grade", "sex"]
    assert listed["diagnosis"]["n_labelled"] == len(records) and listed["sex"]["kind"] == "binary"

    # a refused table leaves the task as it was, and no temporary file behind
    before = (store / TASKS_DIR / "ef.npz").read_bytes()
    table.iloc[[0, 0]].to_csv(tmp_path / "dup.csv", index=False)
    r = runner.invoke(
        app,
        [
            "labels",
            "add",
            str(store),
            "--name",
            "ef",
            "--overwrite",
            "--table",
            str(tmp_path / "dup.csv"),
            "--key",
            "file",
            "--target",
            "ef",
        ],
    )
    assert r.exit_code == 2 and "duplicate key" in r.stderr
    r = runner.invoke(app, ["labels", "add", str(store), "--name", "ef", "--field", "age"])
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    assert (store / TASKS_DIR / "ef.npz").read_bytes() == before
    assert sorted(p.name for p in (store / TASKS_DIR).iterdir()) == [
        "age.npz",
        "ef.npz",
        "grade.npz",
        "sex.npz",
    ]


def test_vocabularies_against_the_corpus_files(samples_dir, tmp_path):
    from ecgplat.vocabularies import vocabulary_labels
    from ingestion.pipeline import ingest

    path = tmp_path / "s"
    ingest("ptbxl", samples_dir / "ptbxl", path, workers=0, progress=False)
    ingest("code15", samples_dir / "code15" / "training_data", path, workers=0, progress=False)
    _ok(["labels", "add", path, "--name", "super", "--vocabulary", "ptbxl-superclass"])
    st = open_store(path)
    task = read_task(st, "super")
    # independent reading: PTB-XL's own tables
    db = pd.read_csv(samples_dir / "ptbxl" / "ptbxl_database.csv", index_col="ecg_id")
    stm = pd.read_csv(samples_dir / "ptbxl" / "scp_statements.csv", index_col=0)
    diag = stm[stm["diagnostic"] == 1]["diagnostic_class"].to_dict()
    want = {}
    for ecg_id, codes in db["scp_codes"].items():
        classes = {diag[c] for c in ast.literal_eval(codes) if c in diag}
        if classes:
            want[f"ptbxl/{ecg_id:05d}"] = classes
    keys = st.records["record_key"].to_numpy()[task.record_index]
    got = {
        k: {task.spec.classes[j] for j in np.flatnonzero(row)}
        for k, row in zip(keys, task.target, strict=True)
    }
    assert got == want and len(want) >= 10
    kind, classes, rows, target = vocabulary_labels(st, "code15-chagas")
    for r, y in zip(rows, target[:, 0], strict=True):
        rid = st.records["record_id"].iloc[int(r)]
        header = (samples_dir / "code15" / "training_data" / f"{rid}.hea").read_text()
        flag = next(ln.split(":", 1)[1].strip() for ln in header.splitlines() if "Chagas" in ln)
        assert y == (1.0 if flag == "True" else 0.0)
    assert kind == "binary" and classes == ("chagas",) and len(rows) == 2


def test_forget_drops_task_rows(store, tmp_path):
    from ecgplat.store.forget import forget

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    _ok(["labels", "add", copy, "--name", "sex2", "--field", "sex"])
    key = open_store(copy).records["record_key"].iloc[3]
    forget(copy, record=key)
    with np.load(copy / TASKS_DIR / "sex2.npz", allow_pickle=False) as data:
        assert 3 not in data["record_index"] and len(data["record_index"]) == 71
    assert 3 not in read_task(open_store(copy), "sex2").record_index


@pytest.fixture(scope="module")
def runs(store, synth_shards, tmp_path_factory):
    """Brief fine-tunes of `sex` (binary) and `age` (regression) from the tiny pretrained model."""
    base = tmp_path_factory.mktemp("runs")
    _ok(["labels", "add", store, "--name", "sex", "--field", "sex", "--overwrite"])
    _ok(["labels", "add", store, "--name", "age", "--field", "age", "--overwrite"])
    common = [
        "--shards",
        synth_shards,
        "--store",
        store,
        "--init",
        PRETRAINED,
        "data.batch_size=16",
        "logging.wandb_mode=disabled",
        "optim.lr=1e-3",
    ]
    _ok(
        [
            "train",
            "finetune",
            "--labels",
            "sex",
            "--out",
            base / "sex",
            *common,
            "optim.max_epoch=2",
            "head.pos_weight=auto",
        ]
    )
    _ok(
        [
            "train",
            "finetune",
            "--labels",
            "age",
            "--out",
            base / "age",
            *common,
            "optim.max_epoch=1",
            "head.loss=huber",
        ]
    )
    return base


def test_finetune_saves_the_task_and_evaluate_scores_it(runs, store, tmp_path):
    ckpt = torch.load(runs / "sex" / "checkpoint_best.pt", weights_only=True)
    task = ckpt["task"]
    assert task["name"] == "sex" and task["kind"] == "binary" and task["threshold_rule"] == "max_f1"
    assert ckpt["kind"] == "diagnosis" and ckpt["model"]["head.weight"].shape[0] == 1
    # the threshold maximises F1 on the valid split's record-level probabilities
    _ok(
        [
            "evaluate",
            "task",
            "--checkpoint",
            runs / "sex" / "checkpoint_best.pt",
            "--store",
            store,
            "--split",
            "valid",
            "--out",
            tmp_path / "valid",
            "--bootstrap",
            "0",
        ]
    )
    valid = pd.read_csv(tmp_path / "valid" / "predictions.csv")
    y, p = valid["target_F"].to_numpy(), valid["p_F"].to_numpy()
    best = max(skm.f1_score(y, p >= t, zero_division=0) for t in np.r_[p, 2.0])
    assert skm.f1_score(y, p >= task["thresholds"][0]) == pytest.approx(best, abs=1e-4)

    out = tmp_path / "test"
    _ok(
        [
            "evaluate",
            "task",
            "--checkpoint",
            runs / "sex" / "checkpoint_best.pt",
            "--store",
            store,
            "--out",
            out,
            "--bootstrap",
            "200",
        ]
    )
    m = json.loads((out / "metrics.json").read_text())
    rec, pred = m["levels"]["record"], pd.read_csv(out / "predictions.csv")
    assert rec["n"] == len(pred) == m["n_records"] and m["levels"]["segment"]["n"] > rec["n"]
    assert rec["auroc"] == pytest.approx(skm.roc_auc_score(pred["target_F"], pred["p_F"]))
    assert (pred["label_F"] == (pred["p_F"] >= task["thresholds"][0])).all()
    assert rec["sensitivity"] == pytest.approx(skm.recall_score(pred["target_F"], pred["label_F"]))
    lo, hi = rec["ci95"]["auroc"]
    assert 0 <= lo <= hi <= 1 and rec["bootstrap"]["unit"] == "patient"
    assert (out / "roc.png").stat().st_size > 1000 and (out / "reliability.png").is_file()

    age = torch.load(runs / "age" / "checkpoint_last.pt", weights_only=True)["task"]
    st = open_store(store)
    train = st.select(split="train")
    ages = st.column("age")[train].astype(np.float64)
    assert age["target_mean"] == pytest.approx([ages.mean()]) and age[
        "target_std"
    ] == pytest.approx([ages.std()])
    _ok(
        [
            "evaluate",
            "task",
            "--checkpoint",
            runs / "age" / "checkpoint_last.pt",
            "--store",
            store,
            "--out",
            tmp_path / "age",
            "--bootstrap",
            "0",
        ]
    )
    m = json.loads((tmp_path / "age" / "metrics.json").read_text())["levels"]["record"]
    pred = pd.read_csv(tmp_path / "age" / "predictions.csv")
    err = pred["value_age"] - pred["target_age"]
    assert m["mae"] == pytest.approx(err.abs().mean(), rel=1e-5)
    assert m["r2"] == pytest.approx(skm.r2_score(pred["target_age"], pred["value_age"]), rel=1e-4)
    assert (tmp_path / "age" / "scatter.png").is_file()


def test_probe_selects_on_valid_and_matches_sklearn(store, runs, tmp_path):
    from sklearn.linear_model import LogisticRegression

    from retrieval.embed import embed_store
    from retrieval.features import load_features

    embed_store(store, PRETRAINED, "pt", progress=False)
    out = _ok(
        [
            "probe",
            "--store",
            store,
            "--features",
            "pt",
            "--labels",
            "sex",
            "--out",
            tmp_path / "probe",
            "--bootstrap",
            "100",
            "--json",
        ]
    )
    m = json.loads(out)
    grid = m["probe"]["grid"]
    assert m["probe"]["C"] == max(grid, key=lambda g: (g["valid"], -g["C"]))["C"]
    # the same probe fitted independently
    st = open_store(store)
    feats = load_features(store, "pt", "record")
    split = st.column("split")[feats.record_index]
    y = (st.column("sex")[feats.record_index] == "F").astype(int)
    x = feats.embeddings.astype(np.float64)
    tr, te = split == "train", split == "test"
    mu, sd = x[tr].mean(0), x[tr].std(0)
    z = (x - mu) / np.where(sd > 0, sd, 1)
    p = LogisticRegression(C=m["probe"]["C"], max_iter=2000, random_state=0).fit(z[tr], y[tr])
    p_te = p.predict_proba(z[te])[:, 1]
    pred = pd.read_csv(tmp_path / "probe" / "predictions.csv")
    np.testing.assert_allclose(pred["p_F"], p_te, atol=1e-5)
    assert m["levels"]["record"]["auroc"] == pytest.approx(skm.roc_auc_score(y[te], p_te), abs=1e-6)


def test_multiclass_resumes_exactly_and_trains_on_a_lead_subset_in_bf16(
    store, synth_shards, tmp_path
):
    """A 3-class task from a table: 4 updates in one run equal 2 + a `--resume` to 4 (losses
    and weights); a 6-lead bf16 run keeps its leads and precision, and `evaluate task` gives
    the argmax confusion matrix of its own predictions (checked by scikit-learn)."""
    from ecgplat.tracking import read_metrics

    st = open_store(store)
    keys = st.records["record_key"].astype(str).to_numpy()
    table = tmp_path / "rhythm.csv"
    pd.DataFrame(
        {"key": keys, "rhythm": np.array(["a", "b", "c"])[np.arange(len(keys)) % 3]}
    ).to_csv(table, index=False)
    _ok(["labels", "add", store, "--name", "rhythm", "--table", table, "--key", "key",
         "--target", "rhythm", "--kind", "multiclass", "--overwrite"])  # fmt: skip
    common = ["train", "finetune", "--labels", "rhythm", "--shards", synth_shards, "--store",
              store, "--init", PRETRAINED, "data.batch_size=8", "logging.wandb_mode=disabled",
              "logging.log_interval=1", "optim.lr=1e-3", "precision=fp32"]  # fmt: skip
    _ok([*common, "--out", tmp_path / "full", "optim.max_update=4"])
    _ok([*common, "--out", tmp_path / "part", "optim.max_update=2"])
    _ok(["train", "finetune", "--out", tmp_path / "part", "--resume", "optim.max_update=4"])
    runs = {n: {r["update"]: r["loss"] for r in read_metrics(tmp_path / n, "loss")}
            for n in ("full", "part")}  # fmt: skip
    assert sorted(runs["full"]) == sorted(runs["part"]) == [1, 2, 3, 4]
    for u, loss in runs["full"].items():  # same process, kernels and batches
        assert runs["part"][u] == pytest.approx(loss, abs=1e-6), u
    a, b = (
        torch.load(tmp_path / n / "checkpoint_last.pt", weights_only=True) for n in ("full", "part")
    )
    assert a["task"]["kind"] == "multiclass" and a["task"]["classes"] == ["a", "b", "c"]
    assert a["model"]["head.weight"].shape[0] == 3
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k

    bf16 = [c for c in common if c != "precision=fp32"] + ["precision=bf16", "--leads", "6"]
    _ok([*bf16, "--out", tmp_path / "six", "optim.max_update=2"])
    six = torch.load(tmp_path / "six" / "checkpoint_last.pt", weights_only=True)
    assert six["config"]["precision"] == "bf16" and six["config"]["data"]["leads"] == "6"
    _ok(["evaluate", "task", "--checkpoint", tmp_path / "six" / "checkpoint_last.pt", "--store",
         store, "--out", tmp_path / "eval", "--bootstrap", "0"])  # fmt: skip
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())["levels"]["record"]
    pred = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    probs = pred[["p_a", "p_b", "p_c"]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    truth = pred["target"].map({"a": 0, "b": 1, "c": 2}).to_numpy()
    cm = skm.confusion_matrix(truth, probs.argmax(1), labels=[0, 1, 2])
    assert m["confusion_matrix"] == cm.tolist()


def _ddp_overrides(extra: list[str]) -> list[str]:
    return ["data.batch_size=4", "logging.wandb_mode=disabled", "logging.log_interval=1",
            "optim.lr=1e-3", "precision=fp32", "optim.max_update=3",
            "model.activation_dropout=0", *extra]  # fmt: skip  # dropout draws differ per rank


def _task_config(out: Path, shards: Path, store: Path, extra: list[str]):
    from training.launch import resolve_run_config

    return resolve_run_config(
        "finetune", None, _ddp_overrides(extra), shards=str(shards), out=out, init=str(PRETRAINED),
        leads=None, store=str(store), resume=False, labels="sex",
    )  # fmt: skip


def _ddp_task_worker(rank: int, world: int, port: int, out: str, shards: str, store: str) -> None:
    import os

    ranks = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
    os.environ.update(ranks, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from training import distributed
    from training.loop import train
    from training.tasks import TASKS

    cfg = _task_config(Path(out), Path(shards), Path(store), ["data.num_workers=0"])
    train(cfg, TASKS["finetune"](cfg))
    distributed.teardown()


def test_two_rank_ddp_fine_tune_of_a_task_equals_one_process(store, synth_shards, tmp_path):
    """A binary task fine-tuned by 2 gloo ranks equals one process reading the same two slots
    (2 loader workers) with 2 accumulated batches per update: losses, weights and the
    thresholds fitted on valid."""
    import socket

    import torch.multiprocessing as mp

    from ecgplat.tracking import read_metrics
    from training.loop import train
    from training.tasks import TASKS

    _ok(["labels", "add", store, "--name", "sex", "--field", "sex", "--overwrite"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = mp.start_processes(
        _ddp_task_worker,
        args=(2, port, str(tmp_path / "ddp"), str(synth_shards), str(store)),
        nprocs=2,
        start_method="fork",  # the children need no re-import
        join=False,
    )
    deadline = time.monotonic() + 300
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("DDP ranks did not finish in 300 s")
    cfg = _task_config(tmp_path / "one", synth_shards, store,
                       ["data.num_workers=2", "optim.update_freq=2"])  # fmt: skip
    train(cfg, TASKS["finetune"](cfg))
    runs = [
        {r["update"]: (r["loss"], r["sample_size"]) for r in read_metrics(tmp_path / n, "loss")}
        for n in ("ddp", "one")
    ]
    assert sorted(runs[0]) == [1, 2, 3] and runs[0].keys() == runs[1].keys()
    for u in runs[0]:  # an all-reduce and a local sum of the same two gradients: float order
        assert runs[0][u][0] == pytest.approx(runs[1][u][0], rel=1e-6), u
        assert runs[0][u][1] == runs[1][u][1] == 8  # 2 x 4 segments per update
    a, b = (
        torch.load(tmp_path / n / "checkpoint_last.pt", weights_only=True) for n in ("ddp", "one")
    )
    # Adam turns a gradient that is only float noise into steps of up to lr (1e-3). The key
    # biases get exactly that: softmax ignores one shift of every key, so their gradient is 0
    # in exact arithmetic. Every other weight: within 1 % of one step.
    for k in a["model"]:
        if not k.endswith("k_proj.bias"):
            assert torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=1e-5), k
    assert a["task"]["kind"] == "binary" and a["task"]["thresholds"] is not None
    np.testing.assert_allclose(a["task"]["thresholds"], b["task"]["thresholds"], atol=1e-6)
