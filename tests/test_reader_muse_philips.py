"""The GE MUSE and Philips XML readers: exact scaling and derived limb leads on synthetic MUSE
files, the CRC and damaged-file rejections, files found by content, and on the real samples (the
bundled Philips files; the MUSE files of ``$ECGPLAT_HOSPITAL_DATA``, whose licences keep them out
of the repository) the rate, duration, amplitude, Einthoven's law and the allow-list: no
identifying value of the file reaches the record."""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from hospital_samples import identifying_values
from muse_xml import MUSE_LEADS, muse_samples, write_muse

from ecgplat.leads import LEADS
from ingestion.readers import muse, philips
from ingestion.readers.record import RawRecord, RecordError
from ingestion.readers.registry import READERS

PHILIPS = Path(__file__).parents[1] / "data" / "samples" / "hospital" / "philips_xml"
HOSPITAL = Path(os.environ.get("ECGPLAT_HOSPITAL_DATA") or "/nonexistent") / "ge_muse"
needs_muse_samples = pytest.mark.skipif(
    not HOSPITAL.is_dir(),
    reason="set ECGPLAT_HOSPITAL_DATA to the hospital sample folder: its ge_muse/ files "
    "(GPL and unlicensed) are not bundled",
)
LSB_MV = 5e-3  # the Philips samples' resolution, 5 µV per LSB
DERIVED = ["III", "aVR", "aVL", "aVF"]


def rows(rec: RawRecord) -> dict[str, np.ndarray]:
    return {name: rec.signal[i].astype(np.float64) for i, name in enumerate(rec.lead_names)}


# --- MUSE, synthetic -----------------------------------------------------------------------------


def test_registered_and_listed_by_content(tmp_path):
    assert READERS["muse"] is muse and READERS["philips"] is philips
    write_muse(tmp_path / "a.xml")
    write_muse(tmp_path / "sub" / "no_extension")
    (tmp_path / "other.xml").write_text('<?xml version="1.0"?><Other/>', encoding="utf-8")
    (tmp_path / "b.xml").write_bytes((PHILIPS / "sierra_129DYPRG.XML").read_bytes())
    (tmp_path / "notes.txt").write_text("RestingECG", encoding="utf-8")
    assert muse.list_records(tmp_path) == ["a.xml", "sub/no_extension"]
    assert philips.list_records(tmp_path) == ["b.xml"]
    assert muse.list_records(tmp_path / "a.xml") == ["a.xml"]


def test_muse_scaling_is_exact(tmp_path):
    known = np.array([0, 1, -1, 2, 1000, -1000, 32767, -32768] * 625, dtype=np.int16)
    leads = {name: np.roll(known, k) for k, name in enumerate(MUSE_LEADS)}
    write_muse(tmp_path / "r.xml", leads=leads, uv_per_bit=4.88)
    rec = muse.read_record(tmp_path, "r.xml")
    got = rows(rec)
    assert rec.signal.dtype == np.float32 and rec.units == "mV" and rec.fs == 500.0
    for name, x in leads.items():
        assert np.array_equal(got[name], (x * 0.00488).astype(np.float32))
    assert got["I"][4] == np.float32(4.88) and got["I"][6] == np.float32(32767 * 0.00488)
    write_muse(tmp_path / "mv.xml", leads=leads, uv_per_bit=0.5, units="MILLIVOLTS")
    assert np.array_equal(rows(muse.read_record(tmp_path, "mv.xml"))["V1"], leads["V1"] * 0.5)


def test_muse_derived_leads_follow_the_formulas_exactly(tmp_path):
    write_muse(tmp_path / "r.xml")
    rec = muse.read_record(tmp_path, "r.xml")
    assert rec.lead_names == list(LEADS) and rec.signal.shape == (12, 5000)
    assert rec.extra["derived_leads"] == DERIVED
    samples = muse_samples()
    i, ii = (samples[n].astype(np.float64) * 0.00488 for n in ("I", "II"))
    want = {"III": ii - i, "aVR": -(i + ii) / 2, "aVL": i - ii / 2, "aVF": ii - i / 2}
    for name, x in want.items():
        assert np.array_equal(rec.signal[LEADS.index(name)], x.astype(np.float32)), name


def test_muse_crc_mismatch_is_rejected_and_a_missing_crc_is_accepted(tmp_path):
    def bad_v3(name, x):
        return zlib.crc32(x.astype("<i2").tobytes()) ^ (1 if name == "V3" else 0)

    write_muse(tmp_path / "bad.xml", crc=bad_v3)
    with pytest.raises(RecordError, match=r"^bad\.xml: lead V3: LeadDataCRC32 does not match"):
        muse.read_record(tmp_path, "bad.xml")
    write_muse(tmp_path / "none.xml", crc=None)
    assert muse.read_record(tmp_path, "none.xml").signal.shape == (12, 5000)


def test_muse_without_demographics_reads(tmp_path):
    write_muse(tmp_path / "r.xml")
    rec = muse.read_record(tmp_path, "r.xml")
    assert rec.patient_id is None and np.isnan(rec.age) and rec.sex == ""
    assert rec.codes == [] and not rec.labels.any()


def test_muse_keeps_only_the_allow_list(tmp_path):
    file = write_muse(tmp_path / "r.xml", patient="SYNTH-PATIENT-0815")
    rec = muse.read_record(tmp_path, "r.xml")
    assert (rec.patient_id, rec.age, rec.sex) == ("SYNTH-PATIENT-0815", 47.0, "F")
    assert rec.codes == [] and set(rec.extra) == {"derived_leads"}
    assert_no_identifying_value(rec, identifying_values(file))
    text = file.read_text(encoding="iso-8859-1")
    capped = text.replace("<PatientAge>47<", "<PatientAge>97<")
    (tmp_path / "old.xml").write_text(capped, encoding="iso-8859-1")
    assert muse.read_record(tmp_path, "old.xml").age == 90.0
    dates_only = text.replace("<PatientAge>47</PatientAge>", "")  # birth 1977-03-14, 2024-06-30
    (tmp_path / "dates.xml").write_text(dates_only, encoding="iso-8859-1")
    assert muse.read_record(tmp_path, "dates.xml").age == 47.0


def _replace_lead_data(text: str, fn) -> str:
    """``text`` with the first Rhythm lead's base64 data replaced by ``fn(data)``."""
    rhythm = text.index("<WaveformType>Rhythm")
    start = text.index("<WaveFormData>", rhythm) + len("<WaveFormData>")
    end = text.index("</WaveFormData>", start)
    return text[:start] + fn(text[start:end]) + text[end:]


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: "".join(d.split())[: len(d) // 8 * 4], "truncated waveform data"),
        (lambda d: d[:-7], "not valid base64"),
        (lambda d: "!!" + d[2:], "not valid base64"),
    ],
)
def test_muse_damaged_base64_is_one_line_error(tmp_path, damage, reason):
    text = write_muse(tmp_path / "r.xml").read_text(encoding="iso-8859-1")
    (tmp_path / "r.xml").write_text(_replace_lead_data(text, damage), encoding="iso-8859-1")
    with pytest.raises(RecordError) as info:
        muse.read_record(tmp_path, "r.xml")
    assert reason in info.value.reason and "\n" not in str(info.value)


@pytest.mark.parametrize("reader", [muse, philips])
def test_wrong_root_and_broken_xml_are_rejected(tmp_path, reader):
    (tmp_path / "x.xml").write_text('<?xml version="1.0"?><Other><a/></Other>', encoding="utf-8")
    with pytest.raises(RecordError, match="root element"):
        reader.read_record(tmp_path, "x.xml")
    (tmp_path / "y.xml").write_text("<RestingECG><Waveform>", encoding="utf-8")
    with pytest.raises(RecordError, match="not well-formed XML"):
        reader.read_record(tmp_path, "y.xml")


# --- Philips, bundled ----------------------------------------------------------------------------


@pytest.mark.parametrize("rel", philips.list_records(PHILIPS))
def test_philips_samples_rate_duration_amplitude_einthoven(rel):
    rec = philips.read_record(PHILIPS, rel)
    assert rec.lead_names == list(LEADS) and rec.signal.dtype == np.float32
    assert rec.fs == 500.0 and rec.signal.shape == (12, 5500)  # 11 s, as the samples state
    x = rows(rec)
    body = slice(0, 5000)  # the last second ends with the cart's 1 mV calibration pulse
    assert 0.3 < np.ptp(x["II"][body]) < 8
    # all 12 leads are measured: I + III = II within the quantisation (2 LSB)
    assert np.abs(x["I"] + x["III"] - x["II"])[body].max() <= 2 * LSB_MV + 1e-6
    assert np.abs(x["aVR"] + (x["I"] + x["II"]) / 2)[body].max() <= 2 * LSB_MV + 1e-6
    assert_no_identifying_value(rec, identifying_values(PHILIPS / rel))


def test_philips_allow_listed_fields():
    got = {rel: philips.read_record(PHILIPS, rel) for rel in philips.list_records(PHILIPS)}
    demo, masked = got["sierra_3191723_demo_1-04_orig.xml"], got["sierra_2020-5-18_15-48-11.xml"]
    assert (demo.sex, demo.age) == ("M", 60.0)  # from the birth and acquisition dates
    assert (masked.sex, masked.age) == ("", 69.0)  # sex "Unknown"
    assert (got["sierra_129DYPRG.XML"].sex, got["sierra_129DYPRG.XML"].age) == ("M", 50.0)
    assert all(r.patient_id for r in got.values())
    assert demo.codes == ["426783006"] and demo.labels.sum() == 1  # SR; LVH, ST codes dropped
    assert got["sierra_129DYPRG.XML"].codes == []


def _philips_text(tmp_path: Path, rel: str) -> tuple[Path, str, str]:
    data = (PHILIPS / rel).read_bytes()
    codec = "utf-16" if data[:2] == b"\xff\xfe" else "utf-8"
    return tmp_path / rel, data.decode(codec), codec


def test_philips_uncompressed_reads_like_xli(tmp_path):
    rel = "sierra_3191723_demo_1-04_orig.xml"
    want = philips.read_record(PHILIPS, rel)
    path, text, codec = _philips_text(tmp_path, rel)
    raw = np.round(want.signal.astype(np.float64) / LSB_MV).astype("<i2").tobytes()
    start = text.index(">", text.index("<parsedwaveforms")) + 1
    end = text.index("</parsedwaveforms>")
    head = text[:start].replace('compression="XLI"', 'compression="Uncompressed"')
    path.write_text(head + base64.b64encode(raw).decode() + text[end:], encoding=codec)
    got = philips.read_record(tmp_path, rel)
    assert np.array_equal(got.signal, want.signal)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: d[: len(d) // 2 // 4 * 4], "truncated XLI data"),
        (lambda d: d[:-3], "not valid base64"),
        (lambda d: d[:100] + "*" + d[101:], "not valid base64"),
    ],
)
def test_philips_damaged_waveform_is_one_line_error(tmp_path, damage, reason):
    rel = "sierra_129DYPRG.XML"
    path, text, codec = _philips_text(tmp_path, rel)
    start = text.index(">", text.index("<parsedwaveforms")) + 1
    end = text.index("</parsedwaveforms>")
    data = "".join(text[start:end].split())
    path.write_text(text[:start] + damage(data) + text[end:], encoding=codec)
    with pytest.raises(RecordError) as info:
        philips.read_record(tmp_path, rel)
    assert reason in info.value.reason and "\n" not in str(info.value)


# --- MUSE, real files ----------------------------------------------------------------------------


@needs_muse_samples
@pytest.mark.parametrize("name", ["IntroECG_MUSE_example.xml", "BRAVEHEART_example1.xml"])
def test_muse_real_samples(name):
    rec = muse.read_record(HOSPITAL, name)
    assert rec.lead_names == list(LEADS) and rec.extra["derived_leads"] == DERIVED
    assert rec.fs == 500.0 and rec.signal.shape == (12, 5000)  # 10 s Rhythm waveform
    x = rows(rec)
    assert 0.3 < np.ptp(x["II"]) < 8
    assert np.abs(x["I"] + x["III"] - x["II"]).max() < 1e-6  # III is derived: exact
    assert_no_identifying_value(rec, identifying_values(HOSPITAL / name))
    if name.startswith("BRAVEHEART"):  # demographic blocks deleted by the publisher
        assert rec.patient_id is None and np.isnan(rec.age) and rec.sex == ""
    else:
        assert rec.patient_id and rec.sex in ("M", "F") and 0 <= rec.age <= 90


# --- the allow-list check ------------------------------------------------------------------------


def assert_no_identifying_value(rec: RawRecord, values: set[str]) -> None:
    """None of ``values`` (``hospital_samples.identifying_values`` of the file, read with a plain
    XML parse) appears as a token in ``repr(rec)``, the file's name aside (chosen by whoever saved
    it: the MUSE sample's name holds its demo patient's name). Short numbers are looked for
    outside the sample array, whose printed digits would match them by chance. The raw patient
    id is looked for too, however short (``identifying_values`` skips short numbers)."""
    values = values | ({rec.patient_id} if rec.patient_id else set())
    rec = dataclasses.replace(rec, path="", record_id="")
    full = repr(rec)
    meta = repr(dataclasses.replace(rec, signal=np.zeros((0, 0), np.float32)))
    assert values, "no identifying value found to look for"
    for value in {" ".join(v.split()) for v in values}:
        text = meta if value.isdigit() and len(value) < 6 else full
        token = re.compile(rf"(?<![0-9A-Za-z]){re.escape(value)}(?![0-9A-Za-z])")
        assert not token.search(text), f"an identifying value ({len(value)} chars) is in repr"
