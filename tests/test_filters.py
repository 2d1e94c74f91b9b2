"""`--filter`: zero-phase band-pass and notch filters in conditioning, recorded per record and in
feature lineages.

Measured on a real PTB-XL record (500 Hz, 10 s): a 0.3 mV 50 Hz hum falls by > 30 dB under
notch=50 while the 0.5-40 Hz band keeps its power within 0.1 dB; a 1 mV 0.1 Hz drift falls by
> 30 dB under bandpass=0.5-40; the filtered QRS lines up with the unfiltered one (lag 0).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_checkpoint

from ecgplat.store import open_store
from ingestion.conditioning import condition
from ingestion.filters import canonical_spec, parse_filter
from ingestion.pipeline import ingest
from ingestion.readers import wfdb_dir
from ingestion.readers.options import ReadOptions

SAMPLES = Path(__file__).parents[1] / "data" / "samples"
FS = 500


@pytest.fixture(scope="module")
def record():
    return wfdb_dir.read_record(SAMPLES / "ptbxl", "records500/00000/00032_hr")


def conditioned(rec, signal, spec=None) -> np.ndarray:
    """(12, T) µV of ``rec`` with ``signal``, conditioned with ``spec``."""
    raw = dataclasses.replace(rec, signal=np.asarray(signal, dtype=np.float32))
    segs = condition(raw, ReadOptions(signal_filter=spec)).segments.astype(np.float64)
    return np.concatenate(list(segs), axis=-1)


def power_at(x: np.ndarray, hz: float) -> float:
    spectrum = np.abs(np.fft.rfft(x, axis=-1)) ** 2
    freqs = np.fft.rfftfreq(x.shape[-1], 1 / FS)
    return float(spectrum[..., np.argmin(abs(freqs - hz))].sum())


def band_power(x: np.ndarray, lo: float = 0.5, hi: float = 40.0) -> float:
    spectrum = np.abs(np.fft.rfft(x, axis=-1)) ** 2
    freqs = np.fft.rfftfreq(x.shape[-1], 1 / FS)
    return float(spectrum[..., (freqs >= lo) & (freqs <= hi)].sum())


def db(a: float, b: float) -> float:
    return 10 * np.log10(a / b)


def test_notch_removes_mains_hum_and_keeps_the_ecg_band(record):
    t = np.arange(record.signal.shape[1]) / record.fs
    hum = record.signal + 0.3 * np.sin(2 * np.pi * 50 * t)
    noisy, notched = conditioned(record, hum), conditioned(record, hum, "notch=50")
    assert db(power_at(noisy, 50), power_at(notched, 50)) > 30
    clean = conditioned(record, record.signal)
    assert abs(db(band_power(notched), band_power(clean))) < 0.1


def test_bandpass_removes_baseline_drift(record):
    t = np.arange(record.signal.shape[1]) / record.fs
    drift = record.signal + 1.0 * np.sin(2 * np.pi * 0.1 * t)
    raw, filtered = conditioned(record, drift), conditioned(record, drift, "bandpass=0.5-40")
    assert db(power_at(raw, 0.1), power_at(filtered, 0.1)) > 30


def test_filters_are_zero_phase(record):
    clean = conditioned(record, record.signal)
    for spec in ("bandpass=0.5-40", "notch=60", "bandpass=0.5-40,notch=50"):
        filtered = conditioned(record, record.signal, spec)
        for lead in (1, 7):  # II and V2: the QRS complexes dominate the correlation
            a = clean[lead] - clean[lead].mean()
            b = filtered[lead] - filtered[lead].mean()
            lag = int(np.argmax(np.correlate(b, a, mode="full"))) - (len(a) - 1)
            assert lag == 0, (spec, lead, lag)


def test_absent_leads_stay_zero_and_default_is_off(record):
    two = dataclasses.replace(record, signal=record.signal[:2], lead_names=record.lead_names[:2])
    out = conditioned(two, two.signal, "bandpass=0.5-40,notch=50")
    assert not out[2:].any()
    assert condition(record).filter == ""
    assert np.array_equal(conditioned(record, record.signal), conditioned(record, record.signal))


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "empty spec"),
        ("lowpass=40", "not bandpass=LO-HI or notch=HZ"),
        ("notch=abc", "not a number"),
        ("notch=300", "outside 0-250"),
        ("bandpass=40-0.5", "low edge must be below"),
        ("bandpass=40", "needs LO-HI"),
        ("notch=50,notch=60", "given twice"),
    ],
)
def test_spec_errors_name_the_option(spec, fragment):
    with pytest.raises(ValueError, match=fragment) as e:
        parse_filter(spec)
    assert str(e.value).startswith("--filter") and "\n" not in str(e.value)


def test_canonical_spec():
    assert canonical_spec(" notch=50 , bandpass=0.50-40.0") == "bandpass=0.5-40,notch=50"
    assert canonical_spec(None) == ""


def test_record_column_and_lineage_carry_the_spec(tmp_path):
    from retrieval.embed import embed_store

    store = tmp_path / "store"
    ingest("cinc2021", SAMPLES / "cinc2021" / "georgia", store, workers=0, progress=False)
    opts = ReadOptions(signal_filter="notch=60,bandpass=0.5-40")
    ingest("wfdb", SAMPLES / "ludb", store, workers=0, progress=False, opts=opts)
    s = open_store(store)
    by_source = dict(zip(s.records["source"], s.records["filter"], strict=False))
    assert by_source == {"cinc2021": "", "wfdb": "bandpass=0.5-40,notch=60"}
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    lineage = embed_store(store, ckpt, "emb", device="cpu")["lineage"]
    assert lineage["filters"] == ["", "bandpass=0.5-40,notch=60"]


def test_a_store_older_than_the_columns(tmp_path):
    import shutil

    store = tmp_path / "store"
    ingest("cinc2021", SAMPLES / "cinc2021" / "georgia", store, workers=0, progress=False)
    for name in ("filter", "derived_mask"):  # as written before issue 21
        shutil.rmtree(store / "records" / name)
    old = open_store(store)
    assert list(old.column("filter")) == ["", ""] and not old.derived_masks.any()
    assert old.derived_masks.shape == (2, 12)
    opts = ReadOptions(signal_filter="notch=50")
    ingest("wfdb", SAMPLES / "ludb", store, workers=0, progress=False, opts=opts)
    s = open_store(store)
    assert list(s.column("filter")) == ["", ""] + ["notch=50"] * 3
    assert s.derived_masks.shape == (5, 12) and not s.derived_masks.any()
