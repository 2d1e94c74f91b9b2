"""Conditioning block by block (the ingest's path: ``open_record``, ``condition``) stores exactly
the segments of conditioning the whole signal at once, and its memory does not grow with a
record's duration (issue 20, item 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import resample_poly

import ingestion.conditioning as C
from ecgplat.leads import LEADS
from ingestion.readers import wfdb_dir
from ingestion.readers.options import DEFAULT_MAX_SECONDS
from ingestion.readers.record import RawRecord, RecordError
from tests.hostile_files import write_wfdb

REPO = Path(__file__).resolve().parents[1]
MIXED = ["II", "pleth", "V1", "II", "aVF"]  # a non-ECG channel and a duplicate lead
FILE_LEADS = ["II", "pleth", "V1", "aVF", "V5"]  # wfdb writes unique names only


def _rec(signal: np.ndarray, fs: float, names: list[str]) -> RawRecord:
    return RawRecord(source="t", record_id="r", path="r", signal=signal, fs=fs, lead_names=names)


def _whole(signal: np.ndarray, fs: float, names: list[str]) -> np.ndarray:
    """The segments of conditioning the whole signal at once (the algorithm before blocks)."""
    ratio = Fraction(1) if fs == 500 else Fraction(500 / fs).limit_denominator(1000)
    dtype = np.float32 if ratio == 1 and signal.dtype == np.float32 else np.float64
    x = np.zeros((12, signal.shape[1]), dtype=dtype)
    for row, name in reversed(list(enumerate(names))):  # the first of a lead wins
        if name in LEADS:
            x[LEADS.index(name)] = signal[row]
    if ratio != 1:
        x = resample_poly(x, ratio.numerator, ratio.denominator, axis=-1)
    n = x.shape[1] // 2500
    segs = x[:, : n * 2500].reshape(12, n, 2500).transpose(1, 0, 2)
    uv = np.multiply(segs, 1000.0, dtype=np.float64)  # float32 input: exact in float64
    return np.clip(np.rint(uv), -32768, 32767).astype(np.int16)


@pytest.mark.parametrize("fs", [250.0, 360.0, 500.0, 1000.0, 10_000.0, 257.0, 128.5])
@pytest.mark.parametrize("names", [MIXED, list(LEADS)], ids=["mixed", "12"])
@pytest.mark.parametrize("block", [3001, C.BLOCK_SAMPLES])
def test_blocks_equal_the_whole_signal(fs, names, block, monkeypatch):
    monkeypatch.setattr(C, "BLOCK_SAMPLES", block)
    rng = np.random.default_rng(int(fs))
    n = int(fs * 23.7) + 3  # not a multiple of a block, a segment or the resampling period
    signal = rng.normal(0.0, 2.0, (len(names), n)).astype(np.float32)
    signal[:, ::997] = 40.0  # beyond the int16 range in µV: clipped alike
    out = C.condition(_rec(signal, fs, names))
    want = _whole(signal, fs, names)
    assert out.segments.shape == want.shape == (len(want), 12, 2500) and len(want) == 4
    assert np.array_equal(out.segments, want)


@pytest.mark.parametrize(("fmt", "fs"), [("16", 1000), ("16", 10_000), ("212", 360), ("32", 250)])
def test_wfdb_blocks_equal_the_whole_read(tmp_path, fmt, fs, monkeypatch):
    monkeypatch.setattr(C, "BLOCK_SAMPLES", 4099)
    write_wfdb(tmp_path, "r", n_sig=5, seconds=31.3, fs=fs, fmt=fmt, names=FILE_LEADS, seed=fs)
    whole = wfdb_dir.read_record(tmp_path, "r")
    opened = wfdb_dir.open_record(tmp_path, "r")
    assert not isinstance(opened.signal, np.ndarray) and opened.signal.shape == whole.signal.shape
    assert isinstance(whole.signal, np.ndarray)
    for a, b in [(0, 1), (7, 3001), (whole.n_samples - 5, whole.n_samples)]:
        assert np.array_equal(opened.signal.block(a, b), whole.signal[:, a:b])
    got = C.condition(opened).segments
    assert np.array_equal(got, C.condition(whole).segments)
    assert np.array_equal(got, _whole(whole.signal, float(fs), FILE_LEADS)) and len(got) == 6


@pytest.mark.parametrize("where", [100, 20_000, 30_900], ids=["first", "late", "dropped-tail"])
def test_nan_anywhere_in_an_ecg_lead_rejects(where, monkeypatch):
    monkeypatch.setattr(C, "BLOCK_SAMPLES", 3001)
    signal = np.zeros((5, 31_000), dtype=np.float32)  # 31 s at 1 kHz: 6 segments, 1 s dropped
    signal[1, :] = np.nan  # the pleth channel is not checked
    ok = C.condition(_rec(signal.copy(), 1000.0, MIXED))
    assert ok.n_segments == 6
    signal[2, where] = np.nan
    with pytest.raises(RecordError, match="NaN or infinite"):
        C.condition(_rec(signal, 1000.0, MIXED))


def test_a_short_record_with_nan_gives_the_nan_reason():
    signal = np.zeros((1, 4000), dtype=np.float32)
    with pytest.raises(RecordError, match="too short: 4.00 s"):
        C.condition(_rec(signal, 1000.0, ["II"]))
    signal[0, 5] = np.inf
    with pytest.raises(RecordError, match="NaN or infinite"):
        C.condition(_rec(signal, 1000.0, ["II"]))


# one ingest (--workers 0: in this process) of one 12-lead 10 kHz format-16 record; the .dat is
# sparse (a hole but for its first 2 s), so it takes no disk
_INGEST = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    import scipy.signal  # imported before the baseline: not the record's memory
    from ingestion.pipeline import ingest

    root, seconds = Path(sys.argv[1]), float(sys.argv[2])
    fs, n = 10_000, int(float(sys.argv[2]) * 10_000)
    src = root / "src"
    src.mkdir()
    with open(src / "rec.dat", "wb") as f:
        f.truncate(n * 12 * 2)
        f.write((np.sin(np.arange(12 * 20_000) / 7) * 2000).astype("<i2").tobytes())
    lines = [f"rec 12 {fs} {n}"]
    lines += [f"rec.dat 16 1000/mV 16 0 0 0 0 {lead}" for lead in sys.argv[3].split(",")]
    (src / "rec.hea").write_text("\\n".join(lines) + "\\n")

    def hwm():
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(x.split()[1]) for x in status if x.startswith("VmHWM")) * 1024

    base = hwm()
    report = ingest("wfdb", src, root / "store", workers=0, progress=False)
    print(json.dumps({"base": base, "peak": hwm(), "segments": report["segments"]}))
    """
)


def _ingest_peaks(tmp_path: Path, *durations: float) -> list[dict]:
    """One ingest process per duration, run at the same time (each process measures its own
    VmHWM, so they do not see each other's memory); their reports in the order given."""
    runs = []
    try:
        for seconds in durations:
            root = tmp_path / f"s{seconds:g}"
            root.mkdir()
            proc = subprocess.Popen(
                [sys.executable, "-c", _INGEST, str(root), str(seconds), ",".join(LEADS)],
                cwd=REPO,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            runs.append((root, proc))
        outs = [proc.communicate(timeout=240) for _, proc in runs]
    finally:
        for root, proc in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for f in (root / "src").glob("*"):
                f.unlink()
    for (_, proc), (_, err) in zip(runs, outs, strict=True):
        assert proc.returncode == 0, err[-2000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_peak_memory_of_the_longest_default_record_does_not_grow_with_duration(tmp_path):
    """The longest record the defaults accept (3,600 s at 12 leads and 10 kHz, a 864 MB file)
    against one of 600 s: the ingest's peak grows by the 500 Hz int16 output only (12 kB per
    second, held twice: segments and their encoded chunks), not by the samples read (before:
    about 7x the file). docs/operations.md states the measured peak."""
    short, longest = _ingest_peaks(tmp_path, 600.0, DEFAULT_MAX_SECONDS)
    assert (short["segments"], longest["segments"]) == (120, 720)
    output = (720 - 120) * 12 * 2500 * 2  # int16 bytes of the 3,000 s more
    assert longest["peak"] - short["peak"] < 2 * output + (16 << 20)
    # what the record adds to the process (measured: 65 MiB; before: 6x the file at 1,200 s)
    assert longest["peak"] - longest["base"] < 128 << 20
