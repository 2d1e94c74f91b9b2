"""LUDB, CODE-15% (Challenge 2025 dialect), non-voltage WFDB units and bring-your-own arrays:
real sample files through the readers, the Dask-free pipeline, the real store and the CLI."""

import re
import shutil

import numpy as np
import pytest
from scipy.signal import resample_poly
from typer.testing import CliRunner

from ecgplat.cli import app
from ecgplat.labels import ABBREVIATIONS, codes_to_multihot
from ecgplat.store import open_store
from ingestion.conditioning import condition
from ingestion.pipeline import ingest
from ingestion.readers import code15, ludb, numpy_arrays, wfdb_dir
from ingestion.readers.record import RecordError

runner = CliRunner()
LEADS12 = "I,II,III,aVR,aVL,aVF,V1,V2,V3,V4,V5,V6"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def classes(labels) -> set[str]:
    return {ABBREVIATIONS[i] for i in np.flatnonzero(labels)}


def read_fmt16(hea_path, n_sig):
    """Independent decode of a single-file format-16 WFDB record: (n_sig, n) physical values."""
    lines = [ln for ln in hea_path.read_text().splitlines() if ln and not ln.startswith("#")]
    gains, bases = [], []
    for line in lines[1 : 1 + n_sig]:
        m = re.match(r"([-\d.]+)\((-?\d+)\)", line.split()[2])
        gains.append(float(m[1]))
        bases.append(float(m[2]))
    dat = hea_path.with_suffix(".dat")
    d = np.fromfile(dat, "<i2").reshape(-1, n_sig).T.astype(np.float64)
    return (d - np.array(bases)[:, None]) / np.array(gains)[:, None]


# --- LUDB ---------------------------------------------------------------------------------------


def test_ludb_signal_metadata_and_labels(samples_dir):
    src = samples_dir / "ludb"
    assert ludb.list_records(src) == ["data/1", "data/104", "data/110"]
    rec = ludb.read_record(src, "data/1")
    expected = read_fmt16(src / "data" / "1.hea", 12)  # per-lead gains and baselines
    np.testing.assert_allclose(rec.signal, expected, rtol=1e-6, atol=1e-6)
    assert rec.lead_names[:3] == ["i", "ii", "iii"] and rec.fs == 500
    assert (rec.age, rec.sex, rec.patient_id, rec.record_id) == (51.0, "F", None, "1")
    assert rec.codes[0] == "Rhythm: Sinus bradycardia" and len(rec.codes) == 5
    assert classes(rec.labels) == {"SB", "LAD"}  # LVH, overload, repolarisation: unmapped
    c = condition(rec)
    assert c.lead_mask.all() and c.segments.shape == (2, 12, 2500) and c.units == "uV"
    assert classes(ludb.read_record(src, "data/104").labels) == {"NSR", "PR"}
    assert classes(ludb.read_record(src, "data/110").labels) == {"AF", "LAD", "PVC|VPB"}


def test_ludb_statement_parsing():
    comments = [
        "<age>: 60",
        "<diagnoses>:",
        "Rhythm: Sinus rhythm.",
        "Atrial extrasystole, type: bigemini. ",
    ]
    assert ludb.diagnoses(["#" + c for c in comments]) == [
        "Rhythm: Sinus rhythm",
        "Atrial extrasystole, type: bigemini",
    ]
    from ecgplat.labels import ludb_to_snomed

    got = classes(
        codes_to_multihot(
            ludb_to_snomed(
                [
                    "Rhythm: Irregular sinus rhythm",
                    "P-synchrony",
                    "Atrial extrasystole: SA-nodal extrasystole",
                    "Incomplete left bundle branch block",
                ]
            )
        )
    )
    assert got == {"SA", "PAC|SVPB"}


# --- CODE-15% -----------------------------------------------------------------------------------


def test_code15_ingest_pseudonyms_and_artefacts(samples_dir, tmp_path):
    src = samples_dir / "code15"
    store_dir = tmp_path / "store"
    summary = ingest("code15", src, store_dir, workers=0, progress=False)
    assert (summary["records"], summary["listed"]) == (5, 7)
    store = open_store(store_dir)
    frame = store.records.set_index("record_id")
    assert sorted(frame.index) == ["1111611", "1111628", "2508934", "9190", "919787"]
    assert set(frame["units"]) == {"uV"} and set(frame["source"]) == {"code15"}
    # one patient's two exams share a pseudonym; nobody else does
    assert frame.loc["1111611", "patient_key"] == frame.loc["1111628", "patient_key"]
    assert frame["patient_key"].nunique() == 4
    assert frame.loc["2508934", "raw_codes"] == "chagas:True"
    assert (frame.loc["2508934", "age"], frame.loc["2508934", "sex"]) == (51.0, "M")
    assert frame.loc["1111611", "seg_count"] == 2 and frame.loc["9190", "seg_count"] == 1
    assert not store.labels.any()  # Chagas is not a scored class
    reasons = dict(zip(store.rejects["path"], store.rejects["reason"], strict=True))
    assert reasons["holdout_data/9190_all_data_is_zero"] == "flat signal: all samples zero"
    assert reasons["holdout_data/9190_low_sample_rate"].startswith("duplicate of exam 9190")
    assert len(reasons) == 2 and frame.loc["919787", "seg_count"] == 1  # 5.18 s: one segment
    raw_ids = set()
    for hea in src.rglob("*.hea"):
        raw_ids.update(re.findall(r"# Patient ID: (\d+)", hea.read_text()))
    blob = b"".join(p.read_bytes() for p in store_dir.rglob("*") if p.is_file())
    assert raw_ids and not any(rid.encode() in blob for rid in raw_ids)


def test_code15_300hz_record_is_resampled(samples_dir, tmp_path):
    """The 300 Hz artefact on its own (its exam's header not beside it) is conditioned like
    any rate: polyphase 300 -> 500 Hz."""
    src = samples_dir / "code15" / "holdout_data"
    shutil.copy(src / "9190_low_sample_rate.hea", tmp_path)
    shutil.copy(src / "9190.dat", tmp_path)
    rec = code15.read_record(tmp_path, "9190_low_sample_rate")
    assert rec.fs == 300 and rec.record_id == "9190"
    c = condition(rec)
    expected = np.rint(resample_poly(rec.signal.astype(np.float64), 5, 3, axis=-1) * 1000)
    assert c.segments.shape == (1, 12, 2500)
    np.testing.assert_array_equal(c.segments[0], expected[:, :2500].astype(np.int16))
    with pytest.raises(RecordError, match="duplicate of exam 9190"):
        code15.read_record(src, "9190_low_sample_rate")


def test_code15_flat_every_lead_constant():
    with pytest.raises(RecordError, match="flat signal: every lead constant"):
        code15.check_not_flat(np.full((12, 3000), 0.5, np.float32), "r")
    code15.check_not_flat(np.eye(12, 3000, dtype=np.float32), "r")  # not flat: no error


# --- non-voltage units (ptbxl_preprocessed, unit z) ---------------------------------------------


def test_z_units_rejected_then_opted_in(samples_dir, tmp_path):
    src = samples_dir / "ptbxl_preprocessed"
    store_dir = tmp_path / "store"
    r = invoke("ingest", "wfdb", src, "--store", store_dir, "--workers", 0, "--no-progress")
    assert r.exit_code == 0, r.output
    store = open_store(store_dir)
    assert store.n_records == 0 and store.n_rejects == 2
    assert all("'z'" in s and "--units z" in s for s in store.rejects["reason"])
    r = invoke(
        "ingest", "wfdb", src, "--store", store_dir, "--workers", 0, "--no-progress", "--units", "z"
    )
    assert r.exit_code == 0, r.output
    store = open_store(store_dir)
    assert store.n_records == 2 and list(store.records["units"]) == ["z", "z"]
    # stored int16 = 1000 x z-score, z = ADC / 500, resampled 250 -> 500 Hz
    hea = src / "records" / "00519.hea"
    z = read_fmt16(hea, 12) if "(" in hea.read_text() else None
    expected = np.clip(np.rint(resample_poly(z, 2, 1, axis=-1) * 1000), -32768, 32767)
    i = int(np.flatnonzero(store.records["record_id"] == "records/00519")[0])
    raw = store.record_segments_raw(i)
    np.testing.assert_array_equal(np.concatenate(list(raw), axis=-1), expected[:, :5000])


def test_units_option_misuse(samples_dir, tmp_path):
    for args in (
        ("ingest", "ludb", samples_dir / "ludb", "--units", "z"),
        ("ingest", "wfdb", samples_dir / "ptbxl_preprocessed", "--units", "mV"),
        ("ingest", "wfdb", samples_dir / "ptbxl_preprocessed", "--units", "furlong"),
        ("ingest", "ludb", samples_dir / "ludb", "--fs", 500),
    ):
        r = invoke(*args, "--store", tmp_path / "s", "--workers", 0)
        assert r.exit_code == 2, r.output
        assert r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "s").exists()


def test_old_store_without_units_column_reads_uv(samples_dir, tmp_path):
    store_dir = tmp_path / "store"
    ingest("ludb", samples_dir / "ludb", store_dir, workers=0, progress=False)
    shutil.rmtree(store_dir / "records" / "units")
    assert list(open_store(store_dir).records["units"]) == ["uV"] * 3


def test_wfdb_channel_scales():
    assert wfdb_dir.channel_scales(["mV", "uV", "NU"], None) == ([0, 1], [1.0, 1e-3], "mV")
    assert wfdb_dir.channel_scales(["z", "z"], None) == ([], [], "mV")
    assert wfdb_dir.channel_scales(["z", "NU"], "z") == ([0], [1.0], "z")
    assert wfdb_dir.channel_scales(["mV", "z"], "z") == ([0], [1.0], "mV")  # voltage wins


# --- bring your own arrays ----------------------------------------------------------------------


def _ecg(n_leads=12, n=5000, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 500.0
    return (
        np.sin(2 * np.pi * 1.2 * t)[None] * rng.uniform(0.3, 2, (n_leads, 1))
        + 0.05 * rng.standard_normal((n_leads, n))
    ).astype(np.float32)


def _numpy_ingest(path, store, *extra):
    return invoke(
        "ingest", "numpy", path, "--store", store, "--workers", 0, "--no-progress", "--json", *extra
    )


def test_numpy_round_trip_layouts_units_and_rates(tmp_path):
    x = _ecg()
    d = tmp_path / "arrays"
    (d / "sub").mkdir(parents=True)
    np.save(d / "a.npy", x)  # (leads, samples)
    np.save(d / "sub" / "b.npy", x.T)  # (samples, leads): detected
    np.savez(d / "c.npz", signal=x * 1000, other=np.zeros(3))  # named array, in uV below
    r = _numpy_ingest(d, tmp_path / "s", "--fs", 500, "--leads", LEADS12)
    assert r.exit_code == 0, r.output
    store = open_store(tmp_path / "s")
    ids = list(store.records["record_id"])
    assert ids == ["a", "c", "sub/b"]
    want = np.clip(np.rint(x.astype(np.float64) * 1000), -32768, 32767).astype(np.int16)
    for i in (0, 2):
        got = np.concatenate(list(store.record_segments_raw(i)), axis=-1)
        np.testing.assert_array_equal(got, want)
    assert set(store.records["units"]) == {"uV"} and store.lead_masks.all()
    # the uV file read as mV is 1000x too large: clipped, so ingest it again with --units uV
    r = _numpy_ingest(
        d / "c.npz", tmp_path / "s2", "--fs", 500, "--leads", LEADS12, "--units", "uV"
    )
    assert r.exit_code == 0, r.output
    got = np.concatenate(list(open_store(tmp_path / "s2").record_segments_raw(0)), axis=-1)
    np.testing.assert_array_equal(got, want)
    # another rate and a lead subset, z units
    np.save(tmp_path / "z.npy", x[:2, :2500])
    r = _numpy_ingest(
        tmp_path / "z.npy", tmp_path / "s3", "--fs", 250, "--leads", "ii, V1", "--units", "z"
    )
    assert r.exit_code == 0, r.output
    s3 = open_store(tmp_path / "s3")
    seg = s3.record_segments_raw(0)
    up = resample_poly(x[:2, :2500].astype(np.float64), 2, 1, axis=-1)
    np.testing.assert_array_equal(
        seg[:, [1, 6]].transpose(1, 0, 2).reshape(2, -1),
        np.rint(up[:, :5000] * 1000).astype(np.int16),
    )
    assert not seg[:, [0, 2, 3, 4, 5, 7, 8, 9, 10, 11]].any()
    assert list(s3.records["units"]) == ["z"] and s3.lead_masks[0].sum() == 2


def test_numpy_patients_csv(tmp_path):
    d = tmp_path / "arrays"
    d.mkdir()
    for name in ("r1", "r2", "r3"):
        np.save(d / f"{name}.npy", _ecg(seed=len(name)))
    csv = tmp_path / "patients.csv"
    csv.write_text("record_id,patient_id,labels\nr1,777001,AF;426783006\nr2,777001,lbbb\nr3,,\n")
    r = _numpy_ingest(d, tmp_path / "s", "--fs", 500, "--leads", LEADS12, "--patients", csv)
    assert r.exit_code == 0, r.output
    store = open_store(tmp_path / "s")
    f = store.records
    assert f["patient_key"][0] == f["patient_key"][1] != f["patient_key"][2]
    assert classes(store.labels[0]) == {"AF", "NSR"} and classes(store.labels[1]) == {"CLBBB|LBBB"}
    assert not store.labels[2].any() and f["raw_codes"][0] == "164889003;426783006"
    blob = b"".join(p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file())
    assert b"777001" not in blob


def test_numpy_bad_files_are_rejected_with_reasons(tmp_path):
    d = tmp_path / "arrays"
    d.mkdir()
    x = _ecg()
    np.save(d / "cube.npy", np.zeros((2, 12, 5000), np.float32))
    bad = x.copy()
    bad[3, 100] = np.nan
    np.save(d / "nan.npy", bad)
    inf = x.copy()
    inf[0, 0] = np.inf
    np.save(d / "inf.npy", inf)
    np.save(d / "eleven.npy", x[:11])
    np.save(d / "text.npy", np.array([["a"] * 5000] * 12))
    (d / "junk.npy").write_bytes(b"not an array at all")
    np.savez(d / "two.npz", a=x, b=x)
    np.save(d / "short.npy", x[:, :2000])
    np.save(d / "good.npy", x)
    csv = tmp_path / "p.csv"
    csv.write_text("record_id,patient_id,labels\ngood,1,XYZ\n")
    r = _numpy_ingest(d, tmp_path / "s", "--fs", 500, "--leads", LEADS12)
    assert r.exit_code == 0, r.output
    store = open_store(tmp_path / "s")
    reasons = dict(zip(store.rejects["path"], store.rejects["reason"], strict=True))
    assert list(store.records["record_id"]) == ["good"]
    assert reasons["cube.npy"].startswith("bad shape (2, 12, 5000)")
    assert reasons["nan.npy"] == reasons["inf.npy"] == "signal contains NaN or infinite values"
    assert reasons["eleven.npy"].startswith("wrong lead count: shape (11, 5000)")
    assert reasons["text.npy"].startswith("not a numeric array")
    assert reasons["junk.npy"].startswith("not a readable .npy/.npz array")
    assert reasons["two.npz"].startswith("npz holds 2 arrays")
    assert reasons["short.npy"].startswith("too short")
    assert all("\n" not in s for s in reasons.values())
    r = _numpy_ingest(
        d / "good.npy", tmp_path / "s2", "--fs", 500, "--leads", LEADS12, "--patients", csv
    )
    assert r.exit_code == 0, r.output
    rej = open_store(tmp_path / "s2").rejects
    assert list(rej["reason"]) == [
        "patients file: unknown label 'XYZ' (not a SNOMED code or a class abbreviation)"
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--leads", LEADS12), "missing sampling rate"),
        (("--fs", 500), "missing lead names"),
        (("--fs", 0, "--leads", LEADS12), "positive"),
        (("--fs", 500, "--leads", "I,II,Q7"), "unknown lead name(s) Q7"),
        (("--fs", 500, "--leads", "I,I"), "named twice"),
        (("--fs", 500, "--leads", LEADS12, "--units", "mmHg"), "unknown unit"),
        (("--fs", 500, "--leads", LEADS12, "--patients", "nope.csv"), "not found"),
    ],
)
def test_numpy_cli_misuse(tmp_path, extra, message):
    np.save(tmp_path / "a.npy", _ecg())
    r = _numpy_ingest(tmp_path / "a.npy", tmp_path / "s", *extra)
    assert r.exit_code == 2 and message in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "s").exists()


def test_numpy_patients_without_record_id_column(tmp_path):
    np.save(tmp_path / "a.npy", _ecg())
    (tmp_path / "p.csv").write_text("id,patient\na,1\n")
    r = _numpy_ingest(
        tmp_path / "a.npy",
        tmp_path / "s",
        "--fs",
        500,
        "--leads",
        LEADS12,
        "--patients",
        tmp_path / "p.csv",
    )
    assert r.exit_code == 2 and "needs a record_id column" in r.output


def test_numpy_reader_orientation_square_is_leads_first():
    sq = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert numpy_arrays.orient(sq, 4, "r") is sq


# --- one options object (ingestion.readers.options.ReadOptions) for every reader ---


def test_reader_fields_refused_where_they_do_not_apply(samples_dir, tmp_path):
    from ingestion.readers.options import ReadOptions

    def run(corpus, src, **fields):
        opts = ReadOptions(**fields)
        ingest(corpus, src, tmp_path / "s", workers=0, progress=False, opts=opts)

    with pytest.raises(ValueError, match="--units does not apply to the ludb reader"):
        run("ludb", samples_dir / "ludb", units="z")
    with pytest.raises(ValueError, match="--fs, --leads does not apply to the wfdb reader"):
        run("wfdb", samples_dir / "ptbxl_preprocessed", fs=500.0, leads="I")
    with pytest.raises(ValueError, match="--units furlong: unknown unit"):
        run("wfdb", samples_dir / "ptbxl_preprocessed", units="furlong")
    with pytest.raises(ValueError, match="missing lead names"):
        run("numpy", samples_dir, fs=500.0)
    assert not (tmp_path / "s").exists()


def test_array_files_obey_the_bounds_and_path_policy(tmp_path):
    from ingestion.readers.options import ReadOptions

    d = tmp_path / "arrays"
    d.mkdir()
    np.save(tmp_path / "outside.npy", _ecg())
    (d / "link.npy").symlink_to(tmp_path / "outside.npy")
    np.save(d / "long.npy", _ecg(n=20 * 500))
    opts = ReadOptions(max_seconds=15, fs=500.0, leads=LEADS12)
    with pytest.raises(RecordError, match="refused: symbolic link"):
        numpy_arrays.read_record(d, "link.npy", opts)
    with pytest.raises(RecordError, match="duration 20 s exceeds the maximum 15 s"):
        numpy_arrays.read_record(d, "long.npy", opts)
    with pytest.raises(RecordError, match="resolves outside SRC"):
        numpy_arrays.read_record(
            d, "link.npy", ReadOptions(follow_symlinks=True, fs=500.0, leads=LEADS12)
        )
    with pytest.raises(RecordError, match="sampling rate 20 Hz is outside"):
        numpy_arrays.read_record(d, "long.npy", ReadOptions(fs=20.0, leads=LEADS12))
    both = ReadOptions(follow_symlinks=True, allow_outside=True, fs=500.0, leads=LEADS12)
    np.testing.assert_array_equal(numpy_arrays.read_record(d, "link.npy", both).signal, _ecg())


def test_units_reach_dask_workers(samples_dir, tmp_path):
    from ingestion.readers.options import ReadOptions

    src = samples_dir / "ptbxl_preprocessed"
    summary = ingest(
        "wfdb", src, tmp_path / "s", workers=1, progress=False, opts=ReadOptions(units="z")
    )
    assert summary["records"] == 2 and summary["rejected"] == {}
    assert list(open_store(tmp_path / "s").records["units"]) == ["z", "z"]
