"""Corpus readers on the bundled real files, checked against independent reads, plus faults."""

import re
import shutil

import numpy as np
import pandas as pd
import pytest
import scipy.io
import wfdb

from ecgplat.labels import ABBREVIATIONS, CLASS_NAMES
from ingestion.conditioning import condition
from ingestion.readers import cinc2021, cpsc2021, ptbxl, wfdb_dir
from ingestion.readers.record import RecordError
from ingestion.readers.registry import READERS, get_reader

CINC = [
    "chapman_shaoxing/JS00001",
    "chapman_shaoxing/JS00005",
    "chapman_shaoxing/JS20000",
    "chapman_shaoxing/JS20012",
    "georgia/E07500",
    "georgia/E07509",
    "ptbxl/HR06000",
    "ptbxl/HR06002",
]


def _expected_multihot(codes):
    return np.array([bool(set(name.split("|")) & set(codes)) for name in CLASS_NAMES])


def test_registry():
    corpora = {"cinc2021", "ptbxl", "wfdb", "cpsc2021", "ludb", "code15", "numpy"}
    vendor = {"muse", "philips", "hl7_aecg", "dicom", "scp", "edf"}  # hospital exports
    assert set(READERS) == corpora | vendor
    for name, mod in READERS.items():
        assert name == mod.SOURCE and callable(mod.list_records) and callable(mod.read_record)
    with pytest.raises(ValueError, match="known"):
        get_reader("mitdb")


# --- CinC 2021 --------------------------------------------------------------------------------


def test_cinc2021_lists_records(samples_dir):
    assert cinc2021.list_records(samples_dir / "cinc2021") == sorted(CINC)


@pytest.mark.parametrize("rel", CINC)
def test_cinc2021_matches_independent_read(samples_dir, rel):
    src = samples_dir / "cinc2021"
    rec = cinc2021.read_record(src, rel)
    text = (src / f"{rel}.hea").read_text()
    # by hand: val / gain from the .mat and the header's gain fields
    val = scipy.io.loadmat(src / f"{rel}.mat")["val"]
    gains = [float(re.match(r"[\d.]+", ln.split()[2]).group()) for ln in text.splitlines()[1:13]]
    assert np.allclose(rec.signal, val / np.array(gains)[:, None], atol=1e-6)
    # and wfdb's own reader of the same files
    assert np.allclose(rec.signal, wfdb.rdrecord(str(src / rel)).p_signal.T, atol=1e-6)
    assert rec.signal.dtype == np.float32 and rec.fs == 500.0 and rec.signal.shape == (12, 5000)
    assert rec.lead_names == [
        "I",
        "II",
        "III",
        "aVR",
        "aVL",
        "aVF",
        "V1",
        "V2",
        "V3",
        "V4",
        "V5",
        "V6",
    ]
    dx = re.search(r"^#\s*Dx:\s*(.*)$", text, re.MULTILINE).group(1).split(",")
    assert rec.codes == dx
    assert np.array_equal(rec.labels, _expected_multihot(dx))
    assert rec.age == float(re.search(r"Age:\s*(\d+)", text).group(1))
    assert rec.sex == re.search(r"Sex:\s*(\w)", text).group(1)
    assert rec.patient_id is None and rec.record_id == rel.split("/")[1]
    assert rec.path == rel and rec.extra["subset"] == rel.split("/")[0]


def test_cinc2021_dialects_and_labels(samples_dir):
    src = samples_dir / "cinc2021"
    js = cinc2021.read_record(src, "chapman_shaoxing/JS00001")  # '16+24 1000/mV', '#Dx:'
    e = cinc2021.read_record(src, "georgia/E07509")  # '16x1+24 1000.0(0)/mV', '# Dx:'

    def names(r):
        return [ABBREVIATIONS[i] for i in np.flatnonzero(r.labels)]

    assert names(js) == ["AF", "CRBBB|RBBB", "TAb"]
    assert names(e) == ["CRBBB|RBBB", "SB"]


def test_cinc2021_age_nan_and_patient_line(samples_dir, tmp_path):
    src = samples_dir / "cinc2021" / "georgia"
    shutil.copy(src / "E07500.mat", tmp_path)
    text = (src / "E07500.hea").read_text()
    text = text.replace("# Age: 78", "# Age: NaN").replace("# Sex: Male", "# Sex: Unknown")
    (tmp_path / "E07500.hea").write_text(text + "# Patient: X17\n")
    rec = cinc2021.read_record(tmp_path, "E07500")
    assert np.isnan(rec.age) and rec.sex == "" and rec.patient_id == "X17"
    (tmp_path / "E07500.hea").write_text(text.replace("# Age: NaN", "#Age: Unknown"))
    assert np.isnan(cinc2021.read_record(tmp_path, "E07500").age)


# --- PTB-XL -----------------------------------------------------------------------------------


def test_ptbxl_matches_csv_and_wfdb(samples_dir):
    src = samples_dir / "ptbxl"
    db = pd.read_csv(src / "ptbxl_database.csv")
    rels = ptbxl.list_records(src)
    assert rels == sorted(db["filename_hr"]) and len(rels) == 13
    by_patient = {}
    for rel in rels:
        rec = ptbxl.read_record(src, rel)
        row = db[db["filename_hr"] == rel].iloc[0]
        sig, fields = wfdb.rdsamp(str(src / rel))
        assert np.allclose(rec.signal, sig.T, atol=1e-6) and rec.fs == 500.0
        assert rec.record_id == f"{row['ecg_id']:05d}" == rel.split("/")[-1][:5]
        assert rec.patient_id == str(int(row["patient_id"]))
        assert rec.sex == ("M" if row["sex"] == 0 else "F") and rec.age == row["age"]
        assert rec.extra["strat_fold"] == row["strat_fold"]
        assert set(rec.codes) == set(eval(row["scp_codes"]))
        assert [canon.upper() for canon in rec.lead_names] == [
            n.upper() for n in fields["sig_name"]
        ]
        by_patient.setdefault(rec.patient_id, []).append(rec.record_id)
    assert sorted(len(v) for v in by_patient.values() if len(v) > 1) == [2] * 5
    assert sorted(by_patient["20191"]) == ["00055", "00056"]


def test_ptbxl_labels(samples_dir):
    src = samples_dir / "ptbxl"

    def names(rel):
        return [ABBREVIATIONS[i] for i in np.flatnonzero(ptbxl.read_record(src, rel).labels)]

    assert names("records500/00000/00032_hr") == ["NSR", "RAD"]  # LPFB unmapped, axis RAD
    assert names("records500/00000/00330_hr") == ["AF"]  # NORM is not a rhythm
    assert names("records500/00000/00141_hr") == ["IAVB", "NSR", "TAb"]


def test_ptbxl_faults(samples_dir, tmp_path):
    with pytest.raises(RecordError, match="not a PTB-XL root"):
        ptbxl.list_records(tmp_path)
    src = tmp_path / "ptbxl"
    shutil.copytree(samples_dir / "ptbxl", src)
    with pytest.raises(RecordError, match="not listed"):
        ptbxl.read_record(src, "records500/00000/99999_hr")
    (src / "records500/00000/00032_hr.dat").unlink()
    with pytest.raises(RecordError, match="missing signal file 00032_hr.dat"):
        ptbxl.read_record(src, "records500/00000/00032_hr")


# --- generic WFDB, CPSC 2021 ------------------------------------------------------------------


def test_ptb_diagnostic_15_leads(samples_dir):
    src = samples_dir / "wfdb_misc"
    rec = wfdb_dir.read_record(src, "s0010_re")
    ref = wfdb.rdrecord(str(src / "s0010_re"))
    assert rec.signal.shape == (15, 38400) and rec.fs == 1000.0
    assert np.allclose(rec.signal, ref.p_signal.T, atol=1e-6)
    assert rec.lead_names[12:] == ["vx", "vy", "vz"] and rec.age == 81 and rec.sex == "F"
    out = condition(rec)
    assert out.lead_mask.all() and out.segments.shape == (7, 12, 2500)  # 19.2 s at 500 Hz
    # lower-case leads in file order; compare with an independent 1000 -> 500 Hz polyphase
    from scipy.signal import resample_poly

    ref500 = resample_poly(ref.p_signal[:, :12].T, 1, 2, axis=1)[:, :2500]
    assert np.abs(out.segments[0] / 1000.0 - ref500).max() <= 0.0006


def test_mitbih_two_leads_and_a103l(samples_dir):
    src = samples_dir / "wfdb_misc"
    assert wfdb_dir.list_records(src) == ["100", "a103l", "s0010_re"]
    rec = wfdb_dir.read_record(src, "100")
    assert rec.lead_names == ["MLII", "V5"] and rec.fs == 360.0
    out = condition(rec)
    assert np.flatnonzero(out.lead_mask).tolist() == [1, 10]
    assert out.segments.shape[0] == 650000 * 500 // 360 // 2500
    a = wfdb_dir.read_record(src, "a103l")  # WFDB '16+24' .mat; PLETH (units NU) dropped
    assert a.lead_names == ["II", "V"] and a.fs == 250.0
    assert np.allclose(
        a.signal, wfdb.rdrecord(str(src / "a103l"), channels=[0, 1]).p_signal.T, atol=1e-6
    )
    assert np.flatnonzero(condition(a).lead_mask).tolist() == [1]  # bare 'V' is not a lead


def test_cpsc2021(samples_dir):
    src = samples_dir / "cpsc2021"
    rels = cpsc2021.list_records(src)
    assert rels == ["data_35_10", "data_35_4", "data_35_6"]
    for rel in rels:
        rec = cpsc2021.read_record(src, rel)
        raw = wfdb.rdrecord(str(src / rel), physical=False)
        by_hand = (raw.d_signal - np.array(raw.baseline)) / np.array(raw.adc_gain)
        assert np.allclose(rec.signal, by_hand.T, atol=1e-5)
        assert rec.patient_id == "35" and rec.fs == 200.0 and rec.lead_names == ["I", "II"]
        assert "atrial fibrillation" in rec.extra["rhythm"]
        out = condition(rec)
        assert out.segments.shape[0] == rec.n_samples * 500 // 200 // 2500
        assert np.flatnonzero(out.lead_mask).tolist() == [0, 1]


# --- faults -----------------------------------------------------------------------------------


@pytest.fixture
def cinc_copy(samples_dir, tmp_path):
    for ext in (".hea", ".mat"):
        shutil.copy(samples_dir / "cinc2021" / "georgia" / f"E07500{ext}", tmp_path)
    return tmp_path


def _error(reader, src, rel):
    with pytest.raises(RecordError) as err:
        reader.read_record(src, rel)
    msg = str(err.value)
    assert msg.startswith(f"{rel}: ") and "\n" not in msg
    return msg


def test_cinc_truncated_mat(cinc_copy):
    data = (cinc_copy / "E07500.mat").read_bytes()
    (cinc_copy / "E07500.mat").write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(cinc2021, cinc_copy, "E07500")


def test_cinc_mat_shape_mismatch(cinc_copy):
    val = scipy.io.loadmat(cinc_copy / "E07500.mat")["val"]
    scipy.io.savemat(cinc_copy / "E07500.mat", {"val": val[:, :4000]}, format="4")
    assert "header says (12, 5000)" in _error(cinc2021, cinc_copy, "E07500")


def test_cinc_missing_files_and_bad_header(cinc_copy):
    (cinc_copy / "E07500.mat").rename(cinc_copy / "keep.mat")
    assert "missing signal file E07500.mat" in _error(cinc2021, cinc_copy, "E07500")
    assert "missing header" in _error(cinc2021, cinc_copy, "nothere")
    (cinc_copy / "keep.mat").rename(cinc_copy / "E07500.mat")
    text = (cinc_copy / "E07500.hea").read_text()
    (cinc_copy / "E07500.hea").write_text(text.replace("E07500 12 500 5000", "E07500 twelve 500"))
    assert "unparsable header" in _error(cinc2021, cinc_copy, "E07500")
    (cinc_copy / "E07500.hea").write_text(text.replace("1000.0(0)/mV", "lots"))
    assert "unparsable header signal line" in _error(cinc2021, cinc_copy, "E07500")


def test_cinc_unknown_format(cinc_copy):
    text = (cinc_copy / "E07500.hea").read_text()
    (cinc_copy / "E07500.hea").write_text(text.replace("E07500.mat", "E07500.dat"))
    assert "unknown format" in _error(cinc2021, cinc_copy, "E07500")
    (cinc_copy / "E07500.hea").write_text(text.replace("16x1+24", "212"))
    assert "unknown format" in _error(cinc2021, cinc_copy, "E07500")


def test_wfdb_faults(samples_dir, tmp_path):
    for f in ("s0010_re.hea", "s0010_re.dat", "s0010_re.xyz", "100.hea", "100.dat"):
        shutil.copy(samples_dir / "wfdb_misc" / f, tmp_path)
    (tmp_path / "s0010_re.xyz").unlink()  # second signal file of a multi-file record
    assert "missing signal file s0010_re.xyz" in _error(wfdb_dir, tmp_path, "s0010_re")
    data = (tmp_path / "100.dat").read_bytes()
    (tmp_path / "100.dat").write_bytes(data[:100_000])
    assert "truncated" in _error(wfdb_dir, tmp_path, "100")
    (tmp_path / "100.hea").write_text(
        "100 2 360 650000\n100.dat 999 200 11 1024 995 0 0 MLII\n"
        "100.dat 999 200 11 1024 1011 0 0 V5\n"
    )
    assert "unknown format" in _error(wfdb_dir, tmp_path, "100")
    (tmp_path / "100.hea").write_text("garbage\n")
    assert "unparsable header" in _error(wfdb_dir, tmp_path, "100")


def _write_cpsc_pair(folder, name: str, sig: np.ndarray) -> None:
    """A 2-lead (I, II) 200 Hz WFDB record in format 16, the way CPSC 2021 files are laid out."""
    wfdb.wrsamp(
        name,
        fs=200,
        units=["mV", "mV"],
        sig_name=["I", "II"],
        p_signal=sig,
        fmt=["16", "16"],
        adc_gain=[1000.0, 1000.0],
        baseline=[0, 0],
        write_dir=str(folder),
    )


def test_cpsc_bad_name_and_nan(samples_dir, tmp_path):
    assert "data_<patient>_<record>" in _error(cpsc2021, tmp_path, "record_35")
    # a WFDB record whose samples are the format's invalid value reads back as NaN
    sig = np.zeros((1200, 2))
    sig[100, 0] = np.nan
    _write_cpsc_pair(tmp_path, "data_7_1", sig)
    rec = cpsc2021.read_record(tmp_path, "data_7_1")
    assert rec.patient_id == "7" and np.isnan(rec.signal[0, 100])
    with pytest.raises(RecordError, match="NaN"):
        condition(rec)
    # too short: 6 s record cut to 4 s in the header and the data
    sig = np.random.default_rng(0).normal(size=(800, 2))
    _write_cpsc_pair(tmp_path, "data_7_2", sig)
    with pytest.raises(RecordError, match="too short: 4.00 s"):
        condition(cpsc2021.read_record(tmp_path, "data_7_2"))


def test_record_error_is_one_line_and_survives_pickling():
    import pickle

    err = RecordError("g1/E1", "bad\nthing  here")
    assert str(err) == "g1/E1: bad thing here"
    back = pickle.loads(pickle.dumps(err))  # dask workers send errors back by pickling
    assert isinstance(back, RecordError) and (back.path, back.reason) == ("g1/E1", "bad thing here")


# --- the MATLAB v4 reader against scipy.io.loadmat ----------------------------------------------


def test_read_mat4_matches_scipy_on_bundled_files(samples_dir):
    mats = sorted(samples_dir.rglob("*.mat"))
    assert mats
    for mat in mats:  # every bundled .mat (CinC 2021 and WFDB '.mat' records) is MATLAB v4
        ref = scipy.io.loadmat(mat)
        for key in (k for k in ref if not k.startswith("__")):
            got = cinc2021.read_mat4(mat.read_bytes(), mat.name, key)
            assert got.shape == ref[key].shape, mat
            np.testing.assert_array_equal(got, ref[key])


@pytest.mark.parametrize("dtype", ["<i2", ">i2", "<f8", ">f4", "<i4", "<u1"])
def test_read_mat4_dtypes_byte_orders_and_several_matrices(tmp_path, dtype):
    rng = np.random.default_rng(0)
    val = rng.integers(0, 100, size=(3, 7)).astype(dtype)
    scipy.io.savemat(tmp_path / "a.mat", {"aaa": np.arange(5.0), "val": val}, format="4")
    data = (tmp_path / "a.mat").read_bytes()
    if dtype.startswith(">"):  # scipy writes native order: rebuild the file big-endian by hand
        name = b"val\0"
        p = {"f8": 0, "f4": 1, "i4": 2, "i2": 3, "u2": 4, "u1": 5}[val.dtype.str[1:]]
        hdr = np.array([1000 + 10 * p, 3, 7, 0, len(name)], ">i4")  # M=1: big-endian
        data = hdr.tobytes() + name + np.asarray(val, val.dtype).T.tobytes()
    got = cinc2021.read_mat4(data, "a.mat")
    np.testing.assert_array_equal(got, val)
    with pytest.raises(KeyError):
        cinc2021.read_mat4(data, "a.mat", key="nope")
    for cut in (3, 21, len(data) - 1):
        with pytest.raises(ValueError, match="truncated"):
            cinc2021.read_mat4(data[:cut], "a.mat")
    with pytest.raises(ValueError, match="not a MATLAB v4"):
        cinc2021.read_mat4(b"MATLAB 5.0 MAT-file" + bytes(200), "a.mat")


# --- one file outside a corpus (the query CLI's reader) ---------------------------------------


def test_read_one_picks_the_reader_by_format(samples_dir):
    from ingestion.one_file import read_one

    cinc = samples_dir / "cinc2021" / "georgia" / "E07500"
    want = condition(cinc2021.read_record(cinc.parent, "E07500"))
    for given in (cinc.with_suffix(".hea"), cinc.with_suffix(".mat"), cinc):
        got = read_one(given)
        assert got.source == "cinc2021" and np.array_equal(got.segments, want.segments)
        assert np.array_equal(got.lead_mask, want.lead_mask) and got.codes == want.codes
    misc = samples_dir / "wfdb_misc"
    for name in ("100", "a103l"):  # a .dat record, and a .mat record not in the challenge format
        got = read_one(misc / f"{name}.hea")
        want = condition(wfdb_dir.read_record(misc, name))
        assert got.source == "wfdb" and np.array_equal(got.segments, want.segments)
    assert np.flatnonzero(read_one(misc / "a103l.mat").lead_mask).tolist() == [1]


def test_read_one_errors_name_the_file(cinc_copy):
    from ingestion.one_file import read_one

    with pytest.raises(RecordError, match=r"nothere\.hea: no WFDB header"):
        read_one(cinc_copy / "nothere.hea")
    data = (cinc_copy / "E07500.mat").read_bytes()
    (cinc_copy / "E07500.mat").write_bytes(data[: len(data) // 2])
    with pytest.raises(RecordError) as err:
        read_one(cinc_copy / "E07500.hea")
    assert str(err.value).startswith(str(cinc_copy / "E07500.hea") + ": ")
    assert "truncated" in str(err.value) and "\n" not in str(err.value)
