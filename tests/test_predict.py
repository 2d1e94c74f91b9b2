"""`ecgplat predict` and `training.predict` on real files: predictions from record files equal
those of the same records ingested into a store (the store split through the predictor, and
`evaluate diagnosis`'s own segment probabilities averaged per record), every task kind against
the model run by hand, thresholds applied as saved, a corrupt file's error row beside the
others' predictions, numpy arrays, no raw patient id in any key, and the CSV / Parquet / JSON
files read back equal."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ecgplat.cli import app
from ecgplat.leads import LEADS
from ecgplat.store import open_store
from ecgplat.tasks import DIAGNOSIS, TaskSpec
from training.models.checkpoint_file import load_encoder, save_checkpoint
from training.models.classifier import DiagnosisModel
from training.tasks.heads import task_entry

torch.set_num_threads(1)

REPO = Path(__file__).parents[1]
PRETRAINED = REPO / "tests" / "fixtures" / "pretrained_tiny" / "w2v_cmsc_rlm_tiny_synth.pt"
RAW_ID = "SYN0"  # the synthetic cohort's raw patient ids are SYN00001...
# Record probabilities go back through the head's inverse (log-odds in float64, then float32
# sigmoid): |error| <= a few float32 ulps of a value <= 1, far below this
ROUND_TRIP = 1e-6


def _checkpoint(path: Path, n_out: int, task: dict | None, normalize: str = "none") -> Path:
    """The committed pretrained tiny encoder with a fresh head of `n_out` outputs."""
    torch.manual_seed(len(path.name))
    model = DiagnosisModel(load_encoder(PRETRAINED), num_classes=n_out)
    with torch.no_grad():  # a spread of outputs, so that thresholds and argmax both matter
        model.head.weight.mul_(30.0)
    return save_checkpoint(
        path,
        kind="diagnosis",
        encoder_config=model.encoder.cfg,
        model=model.state_dict(),
        config={"data": {"normalize": normalize}},
        extra={"leads": "12"},
        task=task,
    )


@pytest.fixture(scope="module")
def world(synth_cohort, synth_store, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("predict")
    st = open_store(synth_store)
    test = st.select(split="test")
    ids = st.records["record_id"].to_numpy()[test].astype(str)
    headers = {p.stem: p for p in synth_cohort.rglob("*.hea")}
    thresholds = np.linspace(0.2, 0.8, DIAGNOSIS.num_outputs).tolist()
    ckpts = {
        "dx": _checkpoint(base / "dx.pt", 26, None, normalize="zscore"),
        "thresholds": _checkpoint(base / "thr.pt", 26, task_entry(DIAGNOSIS, thresholds, "max_f1")),
        "binary": _checkpoint(
            base / "bin.pt", 1, task_entry(TaskSpec("sex", "binary", ("F",)), [0.4], "youden")
        ),
        "multiclass": _checkpoint(
            base / "mc.pt", 3, task_entry(TaskSpec("rhythm", "multiclass", ("a", "b", "c")))
        ),
        "regression": _checkpoint(
            base / "reg.pt",
            1,
            task_entry(TaskSpec("age", "regression", ("age",)), None, None, [61.0], [12.5]),
            normalize="zscore",
        ),
    }
    return {
        "base": base,
        "store": synth_store,
        "test": test,
        "files": [headers[i] for i in ids],  # the test split's records as files
        "keys": {str(k) for k in st.records["record_key"].to_numpy()[test]},
        "cohort": synth_cohort,
        **ckpts,
    }


def _read(paths, **opts):
    from ingestion.input_files import plan_inputs, read_inputs
    from ingestion.readers.options import ReadOptions

    plan = plan_inputs(paths, ReadOptions(**opts))
    return lambda _: read_inputs(plan)


def _probs(row: dict, classes) -> np.ndarray:
    return np.array([row[f"p_{c}"] for c in classes])


def test_files_equal_the_store_and_evaluation(world, tmp_path):
    """The test split's files predicted directly equal the same records ingested and split,
    predicted from the store (same batches: exactly) and evaluated by `evaluate diagnosis`
    (its own inference and record averaging)."""
    from training.evaluate_diagnosis import evaluate_diagnosis
    from training.predict import load_predictor

    # batch_size 2 = one 10 s record per batch in every path, whatever their order
    p = load_predictor(world["dx"], "cpu", "fp32", batch_size=2)
    files = p.predict_files(world["files"], _read(world["files"]))
    stored = list(p.predict_store(world["store"], "test"))
    assert len(files) == len(stored) == len(world["test"]) >= 8
    assert all(r["error"] == "" and r["n_segments"] == 2 for r in files + stored)
    by_id = {r["record"].removesuffix(".hea").rpartition("/")[2]: r for r in files}
    classes = p.task["classes"]
    for row in stored:
        twin = by_id[row["record"].partition("/")[2]]
        np.testing.assert_array_equal(_probs(twin, classes), _probs(row, classes))
        assert twin["checkpoint_sha256"] == row["checkpoint_sha256"]
    assert {r["record"] for r in stored} == world["keys"]

    evaluate_diagnosis(
        world["dx"], world["store"], "test", out=tmp_path / "e", batch_size=2, device="cpu",
        precision="fp32",
    )  # fmt: skip
    with np.load(tmp_path / "e" / "predictions.npz") as npz:
        seg_p, seg_keys = npz["probabilities"].astype(np.float64), npz["record_keys"]
    for row in stored:
        mean = seg_p[seg_keys == row["record"]].mean(axis=0)
        np.testing.assert_allclose(_probs(row, classes), mean, rtol=0, atol=ROUND_TRIP)
    assert len({round(float(v), 3) for row in stored for v in _probs(row, classes)}) > 50

    # a lead subset: the leads outside it zero-filled and masked, as evaluation does
    two = load_predictor(world["dx"], "cpu", "fp32", leads="I,II", batch_size=2)
    rows = two.predict_files(world["files"], _read(world["files"]))
    evaluate_diagnosis(
        world["dx"], world["store"], "test", leads="I,II", out=tmp_path / "e2", batch_size=2,
        device="cpu", precision="fp32",
    )  # fmt: skip
    with np.load(tmp_path / "e2" / "predictions.npz") as npz:
        seg_p, seg_keys = npz["probabilities"].astype(np.float64), npz["record_keys"]
    for row in rows:
        key = "cinc2021/" + row["record"].removesuffix(".hea").rpartition("/")[2]
        mean = seg_p[seg_keys == key].mean(axis=0)
        np.testing.assert_allclose(_probs(row, classes), mean, rtol=0, atol=ROUND_TRIP)
        assert np.abs(_probs(row, classes) - _probs(by_id[key[9:]], classes)).max() > 1e-3


@pytest.mark.parametrize("kind", ["thresholds", "binary", "multiclass", "regression"])
def test_every_kind_against_the_model_by_hand(world, kind):
    """Each task kind's row from the store equals the model run by hand on the record's
    segments (normalised as trained), averaged and labelled by the saved task."""
    from training.normalize import normalize_record
    from training.predict import load_predictor

    p = load_predictor(world[kind], "cpu", "fp32", batch_size=2)  # one record per batch
    rows = {r["record"]: r for r in p.predict_store(world["store"], "test")}
    st, task, classes = open_store(world["store"]), p.task, p.task["classes"]
    keys = st.records["record_key"].to_numpy()
    seen, flips = [], 0  # flips: labels that the saved thresholds set otherwise than 0.5 would
    for r in world["test"]:
        x = normalize_record(st.record_segments(int(r)), p.normalize)
        with torch.no_grad():
            z = p.model(torch.from_numpy(x), lead_mask=torch.from_numpy(st.lead_masks[[r, r]]))
        z = z.double().numpy()
        row = rows[str(keys[r])]
        if kind == "regression":
            value = (z * 12.5 + 61.0).mean(axis=0)
            np.testing.assert_allclose(row["value_age"], value[0], rtol=1e-6)  # float32 output
            seen.append(row["value_age"])
            continue
        if kind == "multiclass":
            prob = (np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)).mean(axis=0)
            assert row["label"] == classes[int(prob.argmax())]
            seen.append(row["label"])
        else:
            prob = (1 / (1 + np.exp(-z))).mean(axis=0)
            thr = np.asarray(task["thresholds"])
            labels = np.array([row[f"label_{c}"] for c in classes])
            np.testing.assert_array_equal(labels, (_probs(row, classes) >= thr).astype(int))
            seen += labels.tolist()
            flips += int(((prob >= thr) != (prob >= 0.5)).sum())
        np.testing.assert_allclose(_probs(row, classes), prob, rtol=0, atol=ROUND_TRIP)
    assert len(set(seen)) > 1, f"{kind}: every record got the same answer {seen[:3]}"
    assert flips > 0 or kind in ("multiclass", "regression")


def test_corrupt_file_gets_a_row_and_keys_hide_patient_ids(world, tmp_path):
    """A folder named after a patient, with a truncated record and a file of no ECG format:
    the two bad files get one-line reasons, the others are predicted as when read alone, and
    no key or reason carries the raw patient id."""
    folder = tmp_path / "in" / "SYN00001"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("not an ECG\n")  # listed before the records
    own = sorted(h for h in world["cohort"].rglob("*.hea") if "SYN00001" in h.read_text())
    assert len(own) == 3
    for hea in own:
        for f in (hea, hea.with_suffix(".mat")):
            shutil.copy(f, folder / f.name)
    bad = folder / own[1].with_suffix(".mat").name
    bad.write_bytes(bad.read_bytes()[:300])
    out = tmp_path / "p.csv"
    args = ["predict", "--checkpoint", world["dx"], "--out", out, tmp_path / "in", "--device",
            "cpu", "--precision", "fp32", "--batch-size", "2", "--no-progress"]  # fmt: skip
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    from training.prediction_table import read_predictions

    frame = read_predictions(out)
    assert len(frame) == 4 and RAW_ID not in out.read_text() and RAW_ID not in res.output
    errors = frame[frame["error"] != ""]
    assert set(errors["record"].str.rpartition("/")[2]) == {"notes.txt", bad.stem + ".hea"}
    assert all("\n" not in e and e for e in errors["error"])
    assert frame["record"].str.match(r"^p-[0-9a-f]{16}/").all(), frame["record"].tolist()
    from training.predict import load_predictor

    p = load_predictor(world["dx"], "cpu", "fp32", batch_size=2)  # the same batches: exact
    good = frame[frame["error"] == ""]
    assert len(good) == 2 and good["p_164889003"].notna().all()
    for _, row in good.iterrows():
        name = row["record"].rpartition("/")[2]
        (alone,) = p.predict_files([folder / name], _read([folder / name]))
        np.testing.assert_array_equal(
            _probs(alone, p.task["classes"]), _probs(row.to_dict(), p.task["classes"])
        )


@pytest.mark.parametrize("kind", ["thresholds", "multiclass", "regression"])
def test_csv_parquet_json_round_trip(world, tmp_path, kind):
    from training.predict import load_predictor
    from training.prediction_table import read_predictions, to_frame, write_predictions

    p = load_predictor(world[kind], "cpu", "fp32")
    files = [*world["files"][:2], REPO / "data" / "samples" / "hospital" / "scp_ecg" / "SOURCE.md"]
    rows = p.predict_files(files, _read(files))
    # rows come in key order, and the keys' common folder differs between machines
    assert {r["record"].rpartition("/")[2]: bool(r["error"]) for r in rows} == {
        files[0].name: False,
        files[1].name: False,
        "SOURCE.md": True,
    }
    expected = to_frame(rows, p.task)
    for ext in (".csv", ".parquet", ".json"):
        back = read_predictions(write_predictions(rows, p.task, tmp_path / f"p{ext}"))
        assert list(back.columns) == list(expected.columns)
        for col in expected.columns:  # float64 values survive every encoding exactly
            a, b = expected[col].to_numpy(), back[col].to_numpy()
            assert a.dtype == b.dtype or col.startswith("label_"), (ext, col)
            assert [str(v) for v in a] == [str(v) for v in b], (ext, col)
        if p.task["thresholds"]:  # the file's own labels are its probabilities at the thresholds
            ok = back[back["error"] == ""]
            for c, t in zip(p.task["classes"], p.task["thresholds"], strict=True):
                assert (ok[f"label_{c}"] == (ok[f"p_{c}"] >= t).astype(int)).all(), (ext, c)


def test_arrays_and_numpy_files(world, tmp_path):
    """predict_array on a stored record's samples, predict_record on its segments, and a .npy
    file of them predicted with --fs all equal the store's row; short or non-finite arrays
    and a .npy without --fs get error rows."""
    from training.predict import load_predictor

    p = load_predictor(world["dx"], "cpu", "fp32", batch_size=2)  # one record per batch
    st = open_store(world["store"])
    r = int(world["test"][0])
    key = str(st.records["record_key"].iloc[r])
    (stored,) = [row for row in p.predict_store(st, "test") if row["record"] == key]
    seg = st.record_segments(r)
    x = seg.transpose(1, 0, 2).reshape(len(LEADS), -1)  # the record's samples again
    classes = p.task["classes"]
    y = x.copy()
    y[3, 4000] = np.inf
    rows = p.predict_array(np.stack([x, y]), keys=["a", "b"])
    rows += p.predict_array(x[:, :2400])
    assert [r["record"] for r in rows] == ["a", "b", "0"]
    assert [r["error"].split(":")[0] for r in rows] == ["", "NaN or infinite values in the signal",
                                                         "too short"]  # fmt: skip
    np.testing.assert_array_equal(_probs(rows[0], classes), _probs(stored, classes))
    one = p.predict_record(seg, st.lead_masks[r], key)
    np.testing.assert_array_equal(_probs(one, classes), _probs(stored, classes))

    np.save(tmp_path / "rec.npy", x)
    (row,) = p.predict_files([tmp_path / "rec.npy"], _read([tmp_path / "rec.npy"], fs=500.0))
    assert row["record"] == "rec.npy" and row["error"] == ""
    np.testing.assert_array_equal(_probs(row, classes), _probs(stored, classes))
    (row,) = p.predict_files([tmp_path / "rec.npy"], _read([tmp_path / "rec.npy"]))
    assert "--fs" in row["error"] and row["p_164889003"] is None


def test_cli_store_split_to_parquet(world, tmp_path):
    """`ecgplat predict --store S --split X --json`: the file holds the library's rows, keyed by
    record key, and the summary counts them."""
    import json

    from training.predict import load_predictor
    from training.prediction_table import read_predictions, to_frame

    out = tmp_path / "sub" / "p.parquet"
    args = ["predict", "--checkpoint", world["binary"], "--out", out, "--store", world["store"],
            "--split", "test", "--device", "cpu", "--precision", "fp32", "--json"]  # fmt: skip
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    p = load_predictor(world["binary"], "cpu", "fp32")
    expected = to_frame(list(p.predict_store(world["store"], "test")), p.task)
    back = read_predictions(out)
    assert summary["records"] == summary["predicted"] == len(back) == len(world["test"])
    assert summary["positives"] == {"F": int(back["label_F"].sum())}
    assert summary["checkpoint_sha256"] == back["checkpoint_sha256"].iloc[0] == p.sha256
    assert list(back["record"]) == list(expected["record"])
    np.testing.assert_array_equal(back["p_F"].to_numpy(), expected["p_F"].to_numpy())
