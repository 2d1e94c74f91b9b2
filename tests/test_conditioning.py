"""Signal conditioning: canonical leads, rejections, 500 Hz resampling, segments, int16 µV."""

import numpy as np
import pytest

from ecgplat.leads import LEADS
from ingestion.conditioning import SEGMENT_SAMPLES, condition
from ingestion.readers.record import RawRecord, RecordError


def _rec(signal, fs=500.0, names=None, **kw):
    signal = np.asarray(signal, dtype=np.float32)
    names = list(LEADS[: signal.shape[0]]) if names is None else names
    return RawRecord(
        source="test", record_id="r1", path="dir/r1", signal=signal, fs=fs, lead_names=names, **kw
    )


def _sine(fs, seconds, freq, amp=1.0, n_leads=1):
    t = np.arange(round(fs * seconds)) / fs
    return np.tile(amp * np.sin(2 * np.pi * freq * t), (n_leads, 1))


@pytest.mark.parametrize("fs", [360.0, 1000.0, 257.0, 250.0])
def test_resampling_keeps_frequency_and_amplitude(fs):
    out = condition(_rec(_sine(fs, 12.0, 10.0, amp=1.5), fs=fs, names=["II"]))
    assert out.segments.shape == (2, 12, SEGMENT_SAMPLES)  # 12 s -> 2 full segments, tail dropped
    x = out.segments[:, 1].astype(np.float64).ravel() / 1000.0  # mV, 5000 samples
    spec = np.abs(np.fft.rfft(x))
    peak_hz = np.argmax(spec) * 500.0 / x.size
    assert peak_hz == pytest.approx(10.0, abs=0.1)
    core = x[200:-200]  # skip the filter's edge transient
    assert np.sqrt(np.mean(core**2)) == pytest.approx(1.5 / np.sqrt(2), rel=0.01)
    # independent check: continuous sine at the output time points
    t = np.arange(x.size) / 500.0
    assert np.max(np.abs(core - 1.5 * np.sin(2 * np.pi * 10 * t)[200:-200])) < 0.01
    assert out.fs_original == fs and out.n_samples_original == round(fs * 12)


def test_segments_are_consecutive_windows_in_microvolts():
    n = 3 * SEGMENT_SAMPLES + 1234
    ramp = (np.arange(n) % 30000) / 1000.0  # mV, exact in int16 µV
    sig = np.vstack([ramp, -ramp])
    out = condition(_rec(sig, names=["V2", "aVR"]))
    assert out.segments.dtype == np.int16 and out.segments.shape == (3, 12, 2500)
    for k in range(3):
        expected = np.rint(ramp[k * 2500 : (k + 1) * 2500] * 1000).astype(np.int16)
        assert np.array_equal(out.segments[k, 7], expected)
        assert np.array_equal(out.segments[k, 3], -expected)
    assert out.lead_mask.tolist() == [i in (3, 7) for i in range(12)]
    others = [i for i in range(12) if i not in (3, 7)]
    assert not out.segments[:, others].any()  # absent leads stay zero


def test_two_lead_mapping_and_non_ecg_channels():
    sig = np.vstack([_sine(500, 6, 5)[0], 2 * _sine(500, 6, 5)[0], np.full(3000, np.nan)])
    out = condition(_rec(sig, names=["MLII", "v1", "PLETH"]))  # NaN only in the dropped channel
    assert np.flatnonzero(out.lead_mask).tolist() == [1, 6]
    assert np.array_equal(out.segments[0, 6], np.rint(2000 * sig[0, :2500]).astype(np.int16))


def test_rounding_and_int16_clipping():
    sig = np.zeros((3, 2500))
    sig[0, :4] = [0.0004, 0.0006, -0.0006, 1.2344]
    sig[1, :2] = [40.0, -40.0]  # beyond +-32.767 mV
    out = condition(_rec(sig))
    assert out.segments[0, 0, :4].tolist() == [0, 1, -1, 1234]
    assert out.segments[0, 1, :2].tolist() == [32767, -32768]


def test_duplicate_lead_first_wins_and_metadata_carried():
    sig = np.vstack([np.ones(2500), 2 * np.ones(2500)])
    rec = _rec(
        sig,
        names=["I", "i"],
        patient_id="12345",
        codes=["426783006"],
        age=61.0,
        sex="F",
        extra={"strat_fold": 3},
    )
    rec.labels[14] = True
    out = condition(rec)
    assert out.segments[0, 0, 0] == 1000
    assert out.record_key == "test/r1" and out.path == "dir/r1" and out.patient_id == "12345"
    assert out.codes == ["426783006"] and out.labels[14] and out.labels.sum() == 1
    assert out.age == 61.0 and out.sex == "F" and out.extra == {"strat_fold": 3}
    assert "12345" not in repr(out) and "12345" not in repr(rec)  # raw ids never in reprs


@pytest.mark.parametrize(
    "signal,fs,names,reason",
    [
        (np.zeros((12, 0)), 500.0, None, "zero-length"),
        (np.zeros((2, 5000)), 500.0, ["vx", "PLETH"], "no ECG lead"),
        (np.where(np.arange(5000) == 10, np.nan, 0.0)[None].repeat(2, 0), 500.0, None, "NaN"),
        (np.where(np.arange(5000) == 10, np.inf, 0.0)[None], 500.0, None, "NaN or infinite"),
        (np.zeros((12, 2449)), 500.0, None, "too short"),
        (np.zeros((1, 1799)), 360.0, ["II"], "too short"),
        (np.zeros((1, 5000)), 0.0, ["II"], "sampling rate"),
        (np.zeros((2, 5000)), 500.0, ["I"], "lead names"),
    ],
)
def test_rejections_name_the_reason(signal, fs, names, reason):
    with pytest.raises(RecordError, match=reason) as err:
        condition(_rec(signal, fs=fs, names=names))
    assert str(err.value).startswith("dir/r1: ") and "\n" not in str(err.value)


def test_exactly_five_seconds_gives_one_segment():
    out = condition(_rec(np.ones((12, 1800)), fs=360.0))
    assert out.segments.shape == (1, 12, 2500)
    assert out.lead_mask.all()
