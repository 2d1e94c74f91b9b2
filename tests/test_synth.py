"""Synthetic cohorts: format round trip, lead consistency, identity, labels matching the signal."""

import json
import re

import numpy as np
import pytest
import scipy.io
import wfdb
from scipy.signal import butter, find_peaks, sosfiltfilt

from ecgplat.labels import ABBREVIATIONS
from ingestion import synth
from ingestion.readers import cinc2021
from ingestion.synth import make_patient, synth_record, write_cohort

FS = 500
_QRS_BAND = butter(3, [8, 25], btype="band", fs=FS, output="sos")


def r_peaks(x: np.ndarray) -> np.ndarray:
    """QRS detector independent of the generator: band-pass, slope energy over leads, peaks."""
    f = sosfiltfilt(_QRS_BAND, x, axis=1)
    e = np.convolve((np.diff(f, axis=1) ** 2).sum(0), np.ones(40) / 40, "same")
    return find_peaks(e, height=0.3 * np.percentile(e, 99), distance=int(0.3 * FS))[0]


def template(x: np.ndarray, before=0.4, after=0.5) -> np.ndarray:
    """Average beat (12, samples) aligned on detected R peaks."""
    b, a = int(before * FS), int(after * FS)
    beats = [x[:, p - b : p + a] for p in r_peaks(x) if b <= p < x.shape[1] - a]
    return np.mean(beats, axis=0)


def _load(root, rel):
    return scipy.io.loadmat(root / f"{rel}.mat")["val"] / 1000.0


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    return root, write_cohort(root, patients=8, records_per_patient=3, label_fraction=0.0, seed=3)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    return root, write_cohort(root, patients=10, records_per_patient=6, label_fraction=1.0, seed=5)


def test_files_reread_by_the_cinc2021_reader(plain):
    root, manifest = plain
    rels = cinc2021.list_records(root)
    assert rels == [r["path"] for r in manifest["records"]] and len(rels) == 24
    assert json.loads((root / "synth_manifest.json").read_text()) == manifest
    for entry in manifest["records"][:6]:
        rec = cinc2021.read_record(root, entry["path"])
        assert rec.patient_id == entry["patient"] and rec.codes == entry["codes"] == ["426783006"]
        assert [ABBREVIATIONS[i] for i in np.flatnonzero(rec.labels)] == ["NSR"]
        assert rec.signal.shape == (12, 5000) and rec.fs == 500
        assert np.allclose(rec.signal, _load(root, entry["path"]), atol=1e-6)
        assert np.allclose(
            rec.signal, wfdb.rdrecord(str(root / entry["path"])).p_signal.T, atol=1e-6
        )
        assert rec.sex in ("M", "F") and 18 <= rec.age < 90
    hea = (root / "g1" / "S000001.hea").read_text().splitlines()
    assert hea[0] == "S000001 12 500 5000"
    assert re.fullmatch(r"S000001\.mat 16\+24 1000/mV 16 0 -?\d+ -?\d+ 0 I", hea[1])
    assert "#Dx: 426783006" in hea and "#Patient: SYN00001" in hea


def test_leads_are_consistent(plain):
    root, manifest = plain
    x = _load(root, manifest["records"][0]["path"])
    i, ii, iii, avr, avl, avf = x[:6]
    tol = 0.0021  # three int16 µV roundings
    assert np.abs(iii - (ii - i)).max() <= tol
    assert np.abs(avr + (i + ii) / 2).max() <= tol
    assert np.abs(avl - (i - ii / 2)).max() <= tol
    assert np.abs(avf - (ii - i / 2)).max() <= tol
    assert 0.3 < np.abs(x).max() < 6.0  # mV-scale ECG, not noise or saturation


def shift_corr(a: np.ndarray, b: np.ndarray, max_lag: int = 25) -> float:
    """Best Pearson correlation of two templates over shifts of +-50 ms (R-peak jitter)."""
    core = b[:, max_lag : b.shape[1] - max_lag].ravel()
    return max(
        np.corrcoef(a[:, max_lag + k : a.shape[1] - max_lag + k].ravel(), core)[0, 1]
        for k in range(-max_lag, max_lag + 1, 2)
    )


def test_records_of_a_patient_resemble_each_other(plain):
    root, manifest = plain
    temps = [template(_load(root, r["path"])) for r in manifest["records"]]
    who = np.array([r["patient"] for r in manifest["records"]])
    n = len(temps)
    corr = np.full((n, n), -2.0)
    for i in range(n):
        for j in range(i + 1, n):
            corr[i, j] = corr[j, i] = shift_corr(temps[i], temps[j])
    same = (who[:, None] == who[None]) & ~np.eye(n, dtype=bool)
    diff = who[:, None] != who[None]
    assert corr[same].mean() > 0.9 and corr[same].mean() > corr[diff].mean() + 0.15
    assert (who[corr.argmax(1)] == who).mean() >= 0.9  # nearest record is the same patient


def test_rate_and_rhythm_labels_match_the_signal(labelled):
    root, manifest = labelled
    seen = set()
    for entry in manifest["records"]:
        rr = np.diff(r_peaks(_load(root, entry["path"]))) / FS
        hr, cv = 60.0 / rr.mean(), rr.std() / rr.mean()
        kind = entry["abnormality"]
        seen.add(kind)
        if kind == "AF":
            assert cv > 0.1, entry
            continue
        assert cv < 0.08 and hr == pytest.approx(entry["heart_rate"], abs=3), entry
        if kind == "SB":
            assert hr < 58, entry
        elif kind == "STach":
            assert hr > 102, entry
        else:
            assert 57 < hr < 98 and "426783006" in entry["codes"], entry
    assert seen == set(synth.ABNORMALITIES)


def _qrs_onset_end(t: np.ndarray, r: int) -> tuple[int, int]:
    """First and last sample near R where the band-passed QRS (|x| summed over leads) exceeds
    30% of its peak."""
    e = np.abs(sosfiltfilt(_QRS_BAND, t, axis=1)).sum(0)
    lo = r - 40  # 80 ms: the P wave ends earlier even with a short PR
    above = lo + np.flatnonzero(e[lo : r + 90] > 0.3 * e[lo : r + 90].max())
    return int(above.min()), int(above.max())


def _p_to_qrs(t: np.ndarray, r: int) -> float:
    """Seconds from the P-wave peak (largest bump before the QRS, all leads) to QRS onset."""
    onset, _ = _qrs_onset_end(t, r)
    pre = t[:, : onset - 10] - np.median(t[:, : onset - 10], axis=1, keepdims=True)
    energy = np.convolve((pre**2).sum(0), np.ones(15) / 15, "same")
    return (onset - int(np.argmax(energy))) / FS


@pytest.mark.parametrize("seed", [11, 12])
def test_morphology_labels_match_the_signal(seed, monkeypatch):
    # slow sinus rates keep the previous beat's T wave out of the PR interval
    monkeypatch.setitem(synth.RATE_RANGES, "normal", (55.0, 62.0))
    rng = np.random.default_rng(seed)
    r = int(0.4 * FS)
    for p in range(4):
        patient = make_patient(np.random.default_rng([seed, p]))
        beat = {
            k: template(synth_record(patient, rng, k)[0])
            for k in (None, "TInv", "IAVB", "CRBBB", "CLBBB")
        }
        normal = beat[None]
        # TInv: the T wave flips sign relative to the same patient's normal beat
        t_seg = slice(r + 60, r + 240)
        assert shift_corr(normal[:, t_seg], -beat["TInv"][:, t_seg], 10) > 0.5
        # IAVB: the P wave sits clearly further before the QRS
        assert _p_to_qrs(beat["IAVB"], r) > _p_to_qrs(normal, r) + 0.05

        # bundle branch blocks: a clearly wider QRS than the patient's normal beat
        def width(t):
            return np.subtract(*_qrs_onset_end(t, r)[::-1]) * 1000 / FS

        for kind in ("CRBBB", "CLBBB"):
            assert width(beat[kind]) > width(normal) + 20, kind


def test_deterministic_and_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "RECORDS_PER_DIR", 4)
    a = write_cohort(tmp_path / "a", 3, 2, seconds=6, seed=9)
    write_cohort(tmp_path / "b", 3, 2, seconds=6, seed=9)
    write_cohort(tmp_path / "c", 3, 2, seconds=6, seed=10)
    assert [r["path"] for r in a["records"]] == [
        "g1/S000001",
        "g1/S000002",
        "g1/S000003",
        "g1/S000004",
        "g2/S000005",
        "g2/S000006",
    ]
    for rel in ("g1/S000001", "g2/S000006"):
        assert (tmp_path / "a" / f"{rel}.mat").read_bytes() == (
            tmp_path / "b" / f"{rel}.mat"
        ).read_bytes()
        assert (tmp_path / "a" / f"{rel}.mat").read_bytes() != (
            tmp_path / "c" / f"{rel}.mat"
        ).read_bytes()
    assert _load(tmp_path / "a", "g1/S000001").shape == (12, 3000)
    before = (tmp_path / "a" / "g1" / "S000001.mat").read_bytes()
    with pytest.raises(FileExistsError, match="not empty"):
        write_cohort(tmp_path / "a", 1, 1)
    assert (tmp_path / "a" / "g1" / "S000001.mat").read_bytes() == before
    for bad in ({"patients": 0}, {"label_fraction": 1.5}, {"seconds": 0}):
        kw = {"patients": 1, "records_per_patient": 1} | bad
        with pytest.raises(ValueError):
            write_cohort(tmp_path / "d", **kw)
    assert "6 records of 3 patients" in synth.summarize(a)
