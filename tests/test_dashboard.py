"""W&B dashboards: an offline evaluation run read back from its files holds the per-class table,
the ROC / PR / calibration charts, the confusion counts, the plots and the checkpoint artifact
with its store's lineage, with values an independent computation (scikit-learn, numpy) gives;
every task kind's media; and no identifier in any W&B file or exported metadata."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from wandb_files import read_run, records

KEY = "p-0123456789abcdef"


pytestmark = pytest.mark.usefixtures("isolated_wandb")


def _all_bytes(root):
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            if not os.path.islink(path):
                with open(path, "rb") as fh:
                    yield path, fh.read()


def test_finetune_and_evaluation_runs_hold_media_artifact_and_no_identifier(
    tmp_path, synth_store, synth_shards
):
    from sklearn.metrics import roc_auc_score
    from sklearn.metrics import roc_curve as sk_roc_curve

    from ecgplat.labels import CLASS_NAMES
    from ecgplat.store import open_store
    from training.cinc_metrics import aggregate_records
    from training.evaluate_diagnosis import evaluate_diagnosis
    from training.export import export_checkpoint, read_metadata
    from training.loop import train
    from training.run_config import load_config
    from training.tasks.diagnosis import DiagnosisTask

    uuid = open_store(synth_store).attrs["store_uuid"]
    # fine-tuning (a tiny model, 2 updates, W&B offline as by default)
    cfg = load_config(
        "diagnosis",
        ["model.preset=tiny", f"data.shards={synth_shards}", f"data.store={synth_store}",
         f"out={tmp_path / 'run'}", "data.batch_size=16", "data.num_workers=0", "device=cpu",
         "finetune.init=none", "optim.max_update=2", "optim.max_epoch=0",
         "logging.wandb_mode=offline", "logging.log_interval=1000"],
    )  # fmt: skip
    train(cfg, DiagnosisTask(cfg))
    run = read_run(tmp_path / "run")
    for name in ("per_class", "roc", "pr", "calibration", "confusion"):
        assert run.table(f"valid/record/{name}")["data"], name
    (model,) = [a for a in run.artifacts if a["type"] == "model"]
    assert model["metadata"]["shards"]["store"]["uuid"] == uuid
    assert model["metadata"]["store"]["store_uuid"] == uuid
    (alias,) = {"best", "last"} & set(model["aliases"])  # W&B adds "latest" in any order
    ckpt = tmp_path / "run" / f"checkpoint_{alias}.pt"
    assert model["entries"] == {ckpt.name: ckpt.resolve().as_uri()}

    # evaluation of that checkpoint, W&B offline
    out = tmp_path / "eval"
    evaluate_diagnosis(ckpt, synth_store, split="test", out=out, batch_size=32,
                       wandb_mode="offline")  # fmt: skip
    run = read_run(out)
    for name in ("per_class", "roc", "pr", "calibration", "confusion"):
        assert run.table(f"12/record/{name}")["data"], name
    assert run.history["12/roc_png"]["_type"] == "image-file"
    assert (run.folder / "files" / run.history["12/roc_png"]["path"]).is_file()
    assert run.history["12/auroc_macro"] > 0  # the scalars are there too

    # the per-class table and a ROC curve against scikit-learn on the saved predictions
    with np.load(out / "predictions.npz") as npz:
        _, p, y = aggregate_records(npz["probabilities"], npz["record_index"], npz["labels"])
    table = run.table("12/record/per_class")
    rows = {r[0]: dict(zip(table["columns"], r, strict=True)) for r in table["data"]}
    assert list(rows) == list(CLASS_NAMES)
    both = [k for k in range(26) if 0 < y[:, k].sum() < len(y)]
    assert both, "the test split should have a class with both label values"
    for k in both:
        row = rows[CLASS_NAMES[k]]
        assert row["support"] == int(y[:, k].sum())
        assert row["auroc"] == pytest.approx(roc_auc_score(y[:, k], p[:, k]), abs=1e-12)
        assert row["tp"] + row["fn"] == row["support"] and row["tp"] + row["fp"] + row["fn"] + \
            row["tn"] == len(y)  # fmt: skip
    k = both[0]
    fpr, tpr, _ = sk_roc_curve(y[:, k], p[:, k], drop_intermediate=False)
    curve = [(r[1], r[2]) for r in run.table("12/record/roc")["data"] if r[0] == CLASS_NAMES[k]]
    np.testing.assert_allclose(np.array(curve), np.c_[fpr, tpr], atol=1e-12)

    # the checkpoint artifact: a reference to the file, with the store's lineage
    (model,) = [a for a in run.artifacts if a["type"] == "model"]
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    meta = model["metadata"]
    assert meta["checkpoint_sha256"] == sha and model["name"] == f"diagnosis-{sha[:16]}"
    assert meta["task"] == {"name": "diagnosis", "kind": "multilabel", "n_outputs": 26}
    assert meta["store"]["store_uuid"] == uuid
    assert meta["store"]["n_records"] == open_store(synth_store).n_records
    assert model["entries"] == {ckpt.name: ckpt.resolve().as_uri()}

    # privacy: no pseudonym, raw patient id or record key anywhere in the W&B files (the
    # transaction log decoded as well), nor in an export's metadata
    export_checkpoint(ckpt, "torchscript", tmp_path / "dx.ts")
    blobs = dict(_all_bytes(tmp_path / "run" / "wandb"))
    st = open_store(synth_store)
    needles = {*st.records["patient_key"], *st.records["record_key"], "SYN0"}
    needles |= {r.split("/", 1)[1] for r in st.records["record_key"]}
    blobs.update(_all_bytes(out / "wandb"))
    for log in (*out.glob("wandb/offline-run-*/*.wandb"),
                *(tmp_path / "run").glob("wandb/offline-run-*/*.wandb")):  # fmt: skip
        blobs[f"<decoded {log}>"] = "\n".join(str(r) for r in records(log)).encode()
    blobs["<export metadata>"] = json.dumps(read_metadata(tmp_path / "dx.ts")).encode()
    found = [(n, p) for p, data in blobs.items() for n in needles if n.encode() in data]
    assert not found, found[:5]


def test_every_task_kind_gets_its_media(tmp_path):
    from ecgplat.tracking import REDACTED, Tracker
    from training.dashboard import evaluation_media, identification_media

    rng = np.random.default_rng(0)
    n = 60
    y_mc, p_mc = rng.integers(0, 3, n), rng.dirichlet([1, 1, 1], n)
    y_bi, p_bi = rng.random((n, 1)) < 0.4, rng.random((n, 1))
    y_rg = rng.normal(50, 10, (n, 2))
    v_rg = y_rg + rng.normal(0, 3, (n, 2))
    tasks = {
        "mc": ({"name": "rhythm", "kind": "multiclass", "classes": ["sr", "af", "other"]},
               y_mc, p_mc),
        "bi": ({"name": "sex", "kind": "binary", "classes": ["F"], "thresholds": [0.3]},
               y_bi, p_bi),
        "rg": ({"name": "age", "kind": "regression", "classes": ["age", "hr"]}, y_rg, v_rg),
    }  # fmt: skip
    ident = {"record": {"rank1": 0.5, "rank5": 0.75, "mAP": 0.6, "n_gallery": 8}}
    curve = np.linspace(0.5, 1.0, 30)
    with Tracker(tmp_path / "run", mode="offline", console=False) as t:
        for prefix, (task, y, s) in tasks.items():
            t.log_media(evaluation_media(task, y, s, f"{prefix}/"))
        t.log_media(identification_media(ident, {"record": curve}))
        t.log_artifact("model-x", "model", {"note": KEY, "n": 3})
    run = read_run(tmp_path / "run")

    cm = np.zeros((3, 3), int)
    np.add.at(cm, (y_mc, p_mc.argmax(1)), 1)
    names = ["sr", "af", "other"]
    got = {(a, b): c for a, b, c in run.table("mc/confusion")["data"]}
    assert all(got[(names[i], names[j])] == cm[i, j] for i in range(3) for j in range(3))
    for name in ("per_class", "roc", "pr", "calibration"):
        assert run.table(f"mc/{name}")["data"], name

    pred = p_bi[:, 0] >= 0.3
    truth = y_bi[:, 0]
    (row,) = run.table("bi/confusion")["data"]
    assert row == ["F", int((truth & pred).sum()), int((~truth & pred).sum()),
                   int((truth & ~pred).sum()), int((~truth & ~pred).sum())]  # fmt: skip
    assert run.table("bi/confusion_matrix")["data"]

    per = {r[0]: r for r in run.table("rg/per_target")["data"]}
    assert per["hr"][1] == pytest.approx(np.abs(v_rg[:, 1] - y_rg[:, 1]).mean(), rel=1e-12)
    scatter = np.array(run.table("rg/scatter_age")["data"], dtype=float)
    np.testing.assert_allclose(scatter, np.c_[y_rg[:, 0], v_rg[:, 0]], rtol=1e-12)

    table = run.table("identification")
    row = dict(zip(table["columns"], table["data"][0], strict=True))
    assert row["level"] == "record" and row["rank5"] == 0.75 and row["rank10"] is None
    np.testing.assert_allclose([r[2] for r in run.table("cmc")["data"]], curve[:20])

    (model,) = [a for a in run.artifacts if a["type"] == "model"]
    assert model["metadata"] == {"note": REDACTED, "n": 3}
    for path, data in _all_bytes(tmp_path):
        assert KEY.encode() not in data, path
