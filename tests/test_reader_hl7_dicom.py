"""The HL7 aECG and DICOM ECG readers: exact scaling on tiny hand-built files (aECG XML; DICOM
written with pydicom in explicit and implicit VR), the bundled real files (leads, rate, length,
amplitude, Einthoven's law), the HL7 and DICOM copies of one recording agreeing
(``aligned_difference``, reusable by other formats' tests), no identifying value of the files in
a record, and hostile files (entity bomb, external entity, a huge declared waveform, truncation)
refused with a one-line ``RecordError``."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hospital_samples import identifying_values, keep
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ecgplat.leads import LEADS, canonical_lead
from ingestion.conditioning import resample_to
from ingestion.readers import dicom_ecg, hl7_aecg
from ingestion.readers.options import ReadOptions
from ingestion.readers.record import RawRecord, RecordError

HOSPITAL = Path(__file__).parents[1] / "data" / "samples" / "hospital"
HL7, DICOM = HOSPITAL / "hl7_aecg", HOSPITAL / "dicom_ecg"
TWELVE_LEAD = "1.2.840.10008.5.1.4.1.1.9.1.1"


# --- comparing two records of one recording (other formats' tests reuse this) -----------------


def aligned_difference(
    a: RawRecord, b: RawRecord, fs: int = 500, max_lag_s: float = 0.5
) -> tuple[list[str], float, int]:
    """``(common leads, max |a - b| in mV, lag)`` of two records of the same recording: both
    resampled to ``fs``, ``b`` shifted by the lag (within ``max_lag_s``, in samples at ``fs``)
    that minimises the mean absolute difference of the common canonical leads, the maximum taken
    over the overlap (less 0.1 s at each end when a record was resampled)."""
    names_a = [canonical_lead(n) for n in a.lead_names]
    names_b = [canonical_lead(n) for n in b.lead_names]
    leads = [lead for lead in LEADS if lead in names_a and lead in names_b]
    assert leads, "no common lead"
    xa = resample_to(a.signal[[names_a.index(x) for x in leads]].astype(np.float64), a.fs, fs)
    xb = resample_to(b.signal[[names_b.index(x) for x in leads]].astype(np.float64), b.fs, fs)
    edge = 0 if a.fs == b.fs == fs else fs // 10
    xa, xb = xa[:, edge : xa.shape[1] - edge], xb[:, edge : xb.shape[1] - edge]
    best: tuple[float, int] | None = None
    for lag in range(-int(max_lag_s * fs), int(max_lag_s * fs) + 1):
        pa, pb = (xa[:, lag:], xb) if lag >= 0 else (xa, xb[:, -lag:])
        n = min(pa.shape[1], pb.shape[1])
        if n < fs:
            continue
        score = float(np.abs(pa[:, :n] - pb[:, :n]).mean())
        if best is None or score < best[0]:
            best = (score, lag)
    assert best is not None, "records too short to align"
    lag = best[1]
    pa, pb = (xa[:, lag:], xb) if lag >= 0 else (xa, xb[:, -lag:])
    n = min(pa.shape[1], pb.shape[1])
    return leads, float(np.abs(pa[:, :n] - pb[:, :n]).max()), lag


# --- hand-built files ---------------------------------------------------------------------------

AECG_NS = 'xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'


def _lead(code: str, digits: list[int], scale: str, origin: str | None = None) -> str:
    value, unit = scale.split()
    origin_xml = ""
    if origin is not None:
        o_value, o_unit = origin.split()
        origin_xml = f'<origin value="{o_value}" unit="{o_unit}"/>'
    return (
        f'<component><sequence><code code="{code}"/><value xsi:type="SLIST_PQ">{origin_xml}'
        f'<scale value="{value}" unit="{unit}"/><digits>{" ".join(map(str, digits))}</digits>'
        "</value></sequence></component>"
    )


def aecg(increment: str = "0.004 s", leads: str = "", doctype: str = "", body: str = "") -> bytes:
    """A small aECG document: a RHYTHM series with the given lead sequences, preceded by a
    representative beat (``derivedSeries``) the reader must not take."""
    step, unit = increment.split()
    time = (
        '<component><sequence><code code="TIME_ABSOLUTE"/><value xsi:type="GLIST_TS">'
        f'<head value="20200101120000"/><increment value="{step}" unit="{unit}"/></value>'
        "</sequence></component>"
    )
    beat = (
        '<derivation><derivedSeries><code code="REPRESENTATIVE_BEAT"/><component><sequenceSet>'
        f"{time}{_lead('MDC_ECG_LEAD_I', [999, 999], '1 mV')}</sequenceSet></component>"
        "</derivedSeries></derivation>"
    )
    text = (
        f'<?xml version="1.0"?>{doctype}<AnnotatedECG {AECG_NS}>{body}<component><series>'
        f'<code code="RHYTHM"/><component><sequenceSet>{time}{leads}</sequenceSet></component>'
        f"{beat}</series></component></AnnotatedECG>"
    )
    return text.encode()


def test_aecg_scaling_is_exact(tmp_path):
    leads = (
        _lead("MDC_ECG_LEAD_I", [-4, 0, 4, 400], "2.5 uV", "10 uV")
        + _lead("MDC_ECG_LEAD_V7", [1, 2, 3, 4], "1 uV")  # not a standard lead: dropped
        + _lead("MDC_ECG_LEAD_AVR", [-2, -1, 1, 2], "0.005 mV", "-0.5 mV")
        + _lead("MDC_ECG_LEAD_I", [7, 7, 7, 7], "1 uV")  # a repeated lead: the first is kept
    )
    (tmp_path / "tiny.txt").write_bytes(aecg("4 ms", leads))
    assert hl7_aecg.list_records(tmp_path) == ["tiny.txt"]  # found by content, not extension
    rec = hl7_aecg.read_record(tmp_path, "tiny.txt")
    assert rec.lead_names == ["I", "aVR"] and rec.fs == 250.0 and rec.units == "mV"
    want = np.array([[0.0, 0.01, 0.02, 1.01], [-0.51, -0.505, -0.495, -0.49]], dtype=np.float32)
    assert rec.signal.dtype == np.float32
    np.testing.assert_array_equal(rec.signal, want)
    assert (rec.patient_id, rec.sex, rec.record_id) == (None, "", "tiny")
    assert np.isnan(rec.age)


def test_aecg_keeps_only_the_allow_listed_patient_fields(tmp_path):
    subject = (
        "<componentOf><timepointEvent><componentOf><subjectAssignment><subject><trialSubject>"
        '<id root="1.2.3" extension="SUBJ-0042"/><subjectDemographicPerson><name>Doe</name>'
        '<administrativeGenderCode code="F"/><birthTime value="19300615"/>'
        "</subjectDemographicPerson></trialSubject></subject></subjectAssignment></componentOf>"
        "</timepointEvent></componentOf>"
    )
    body = f'<effectiveTime><center value="20250614093000"/></effectiveTime>{subject}'
    (tmp_path / "a.xml").write_bytes(
        aecg(leads=_lead("MDC_ECG_LEAD_II", [1, 2], "1 uV"), body=body)
    )
    rec = hl7_aecg.read_record(tmp_path, "a.xml")
    assert (rec.patient_id, rec.sex, rec.age) == ("SUBJ-0042", "F", 90.0)  # 94 -> capped
    assert "Doe" not in repr(rec) and "1930" not in repr(rec) and "2025" not in repr(rec)


def _channel(code: tuple[str, str, str], sensitivity, unit, correction=None, baseline=None):
    ch = Dataset()
    source = Dataset()
    source.CodeValue, source.CodingSchemeDesignator, source.CodeMeaning = code
    ch.ChannelSourceSequence = Sequence([source])
    ch.ChannelSensitivity = sensitivity
    units = Dataset()
    units.CodeValue, units.CodingSchemeDesignator, units.CodeMeaning = unit, "UCUM", unit
    ch.ChannelSensitivityUnitsSequence = Sequence([units])
    if correction is not None:
        ch.ChannelSensitivityCorrectionFactor = correction
    if baseline is not None:
        ch.ChannelBaseline = baseline
    ch.WaveformBitsStored = 16
    return ch


def _group(label: str, channels: list[Dataset], samples: np.ndarray, fs: float = 500.0, **kw):
    group = Dataset()
    group.MultiplexGroupLabel = label
    group.NumberOfWaveformChannels = kw.get("n_channels", len(channels))
    group.NumberOfWaveformSamples = kw.get("n_samples", samples.shape[0])
    group.SamplingFrequency = fs
    group.ChannelDefinitionSequence = Sequence(channels)
    group.WaveformBitsAllocated = 16
    group.WaveformSampleInterpretation = "SS"
    group.WaveformData = samples.astype("<i2").tobytes()
    return group


RHYTHM_INTS = np.array([[-4, 10, 7, 1], [0, 20, 7, 2], [4, -30, 7, 3], [400, 0, 7, 4]])
CHANNELS = [
    (("5.6.3-9-1", "SCPECG", "Lead I (Einthoven)"), "2.5", "uV", None, None),
    (("2:62", "MDC", "Lead aVR"), "0.005", "mV", "2", "0.1"),  # x 0.005 x 2 + 0.1 mV
    (("5.6.3-9-15", "SCPECG", "Lead V7"), "1", "uV", None, None),  # not a standard lead
    (("x", "99LOCAL", "Lead V3"), "1", "V", None, None),  # by its code meaning
]
WANT = np.array(
    [[-0.01, 0.0, 0.01, 1.0], [0.2, 0.3, -0.2, 0.1], [1000.0, 2000.0, 3000.0, 4000.0]],
    dtype=np.float32,
)


def tiny_dicom(path: Path, implicit: bool, preamble: bool = True, **kw) -> Path:
    """A DICOM 12-lead ECG file: a MEDIAN BEAT group first, then the RHYTHM group of
    ``CHANNELS`` with ``RHYTHM_INTS`` (keyword arguments change its declared sizes), a synthetic
    patient aged 95 ("095Y", kept as 90)."""
    ds = Dataset()
    ds.SOPClassUID = TWELVE_LEAD
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.PatientName = "Synthetic^Patient"
    ds.PatientID = "TINY-PATIENT-7"
    ds.PatientSex = "F"
    ds.PatientAge = "095Y"
    ds.StudyDate = "20240102"
    ds.InstitutionName = "Nowhere General"
    ds.Modality = "ECG"
    median = _group("MEDIAN BEAT", [_channel(CHANNELS[0][0], "1", "mV")], np.full((2, 1), 99))
    rhythm = _group("RHYTHM", [_channel(*c) for c in CHANNELS], RHYTHM_INTS, **kw)
    ds.WaveformSequence = Sequence([median, rhythm])
    if preamble:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = TWELVE_LEAD
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        )
    pydicom.dcmwrite(
        path, ds, implicit_vr=implicit, little_endian=True, enforce_file_format=preamble
    )
    return path


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit-VR", "implicit-VR"])
def test_dicom_scaling_is_exact(implicit, tmp_path):
    tiny_dicom(tmp_path / "ecg.bin", implicit)
    (tmp_path / "not_dicom.dcm").write_bytes(b"\0" * 128 + b"DICX" + b"\0" * 64)
    assert dicom_ecg.list_records(tmp_path) == ["ecg.bin"]
    rec = dicom_ecg.read_record(tmp_path, "ecg.bin")
    assert rec.lead_names == ["I", "aVR", "V3"] and rec.fs == 500.0 and rec.units == "mV"
    assert rec.signal.dtype == np.float32
    np.testing.assert_array_equal(rec.signal, WANT)
    assert (rec.patient_id, rec.sex, rec.age, rec.record_id) == ("TINY-PATIENT-7", "F", 90.0, "ecg")
    for value in ("Synthetic", "Nowhere", "20240102", "1.2.3.4.5.6.7", "TINY-PATIENT-7"):
        assert value not in repr(rec)


def test_dicom_without_preamble_is_found_by_its_sop_class(tmp_path):
    tiny_dicom(tmp_path / "bare", implicit=True, preamble=False)
    assert (tmp_path / "bare").read_bytes()[128:132] != b"DICM"
    assert dicom_ecg.list_records(tmp_path) == ["bare"]
    np.testing.assert_array_equal(dicom_ecg.read_record(tmp_path, "bare").signal, WANT)


def test_dicom_age_from_birth_and_acquisition_dates(tmp_path):
    tiny_dicom(tmp_path / "e.dcm", implicit=False)
    ds = pydicom.dcmread(tmp_path / "e.dcm")
    del ds.PatientAge
    ds.PatientBirthDate, ds.AcquisitionDateTime = "19800310", "20240309101500"
    ds.save_as(tmp_path / "e.dcm")
    rec = dicom_ecg.read_record(tmp_path, "e.dcm")
    assert rec.age == 43.0 and "1980" not in repr(rec) and "2024" not in repr(rec)


# --- the bundled real files ---------------------------------------------------------------------

REAL = [
    (hl7_aecg, HL7, "FDA_HL7_Example_aECG.xml", 500.0, 5000, 2.5e-3),
    (dicom_ecg, DICOM, "ECGToolkit_Example.dcm", 500.0, 5000, 2.5e-3),
    (dicom_ecg, DICOM, "dicom-ecg-plot_anonymous_ecg.dcm", 1000.0, 10000, 1.25e-3),
]


@pytest.mark.parametrize("reader, src, rel, fs, n, lsb", REAL, ids=[r[2] for r in REAL])
def test_real_files_read_as_the_hospital_readme_states(reader, src, rel, fs, n, lsb):
    assert rel in reader.list_records(src)
    rec = reader.read_record(src, rel)
    assert sorted(rec.lead_names) == sorted(LEADS) and rec.signal.shape == (12, n)
    assert rec.fs == fs and rec.signal.dtype == np.float32 and rec.units == "mV"
    lead = {name: rec.signal[i].astype(np.float64) for i, name in enumerate(rec.lead_names)}
    assert 0.3 < np.ptp(lead["II"]) < 8.0
    assert np.abs(lead["I"] + lead["III"] - lead["II"]).max() <= 2 * lsb + 1e-6
    assert rec.patient_id and rec.sex in ("M", "F") and 0 <= rec.age <= 90


def test_minimal_aecg_reads_its_13_samples():
    assert "FDA_minimum_aecg.xml" in hl7_aecg.list_records(HL7)
    rec = hl7_aecg.read_record(HL7, "FDA_minimum_aecg.xml")
    assert rec.lead_names == ["II"] and rec.signal.shape == (1, 13) and rec.fs == 500.0
    np.testing.assert_allclose(rec.signal[0, :3], [-0.005] * 3, rtol=0, atol=1e-7)


def test_hl7_and_dicom_copies_of_one_recording_agree():
    a = hl7_aecg.read_record(HL7, "FDA_HL7_Example_aECG.xml")
    b = dicom_ecg.read_record(DICOM, "ECGToolkit_Example.dcm")
    leads, diff, lag = aligned_difference(a, b)
    assert leads == list(LEADS) and lag == 0
    assert diff <= 2.5e-3  # one quantisation step (2.5 uV)


def test_only_one_format_lists_each_file():
    assert dicom_ecg.list_records(HL7) == [] and hl7_aecg.list_records(DICOM) == []


# --- no identifying value in a record -----------------------------------------------------------


# pydicom warns of the ECG Toolkit sample's invalid UIDs when the test itself parses the file
OWN_PARSE_WARNS = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")


def _leaks(values: set[str], text: str) -> list[str]:
    return [
        v for v in values if re.search(rf"(?<![0-9A-Za-z.]){re.escape(v)}(?![0-9A-Za-z])", text)
    ]


@OWN_PARSE_WARNS
@pytest.mark.parametrize("reader, src, rel, fs, n, lsb", REAL, ids=[r[2] for r in REAL])
def test_no_identifying_value_reaches_the_record(reader, src, rel, fs, n, lsb):
    values = identifying_values(src / rel)
    assert len(values) >= 5, "the test found too few identifying values to look for"
    rec = reader.read_record(src, rel)
    if keep(rec.patient_id):  # the raw id is kept, out of repr, for the store's pseudonym
        assert rec.patient_id in values
    assert not _leaks(values, repr(rec) + repr(vars(rec).get("extra")))


# --- hostile files ------------------------------------------------------------------------------


def test_entity_bomb_is_refused_unexpanded(tmp_path):
    levels = ['<!ENTITY e0 "lol">'] + [
        f'<!ENTITY e{i} "{f"&e{i - 1};" * 10}">' for i in range(1, 10)
    ]
    doctype = f"<!DOCTYPE AnnotatedECG [{''.join(levels)}]>"
    (tmp_path / "bomb.xml").write_bytes(aecg(doctype=doctype, body="<title>&e9;</title>"))
    with pytest.raises(RecordError, match="unsafe XML refused") as info:
        hl7_aecg.read_record(tmp_path, "bomb.xml")
    assert "\n" not in str(info.value) and "lol" not in str(info.value)


def test_external_entity_is_refused_unfetched(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-VALUE")
    doctype = f'<!DOCTYPE AnnotatedECG [<!ENTITY ext SYSTEM "file://{secret}">]>'
    (tmp_path / "ext.xml").write_bytes(aecg(doctype=doctype, body="<title>&ext;</title>"))
    with pytest.raises(RecordError, match="unsafe XML refused") as info:
        hl7_aecg.read_record(tmp_path, "ext.xml")
    assert "TOP-SECRET" not in str(info.value)


def _no_samples_read(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("WaveformData was read")

    monkeypatch.setattr(dicom_ecg, "_samples", refuse)


def test_dicom_declaring_a_huge_waveform_is_refused_before_reading_it(tmp_path, monkeypatch):
    _no_samples_read(monkeypatch)
    tiny_dicom(tmp_path / "huge.dcm", implicit=False, n_samples=2**32 - 1)
    with pytest.raises(RecordError, match="exceeds the maximum"):
        dicom_ecg.read_record(tmp_path, "huge.dcm")
    tiny_dicom(tmp_path / "long.dcm", implicit=True)  # 4 samples at 500 Hz: 8 ms
    with pytest.raises(RecordError, match="exceeds the maximum"):
        dicom_ecg.read_record(tmp_path, "long.dcm", ReadOptions(max_seconds=0.005))
    tiny_dicom(tmp_path / "wide.dcm", implicit=True, n_channels=5)  # more than the data holds
    with pytest.raises(RecordError, match="truncated"):
        dicom_ecg.read_record(tmp_path, "wide.dcm")


@OWN_PARSE_WARNS
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.95, 0.999])
@pytest.mark.parametrize("reader, src, rel, fs, n, lsb", REAL, ids=[r[2] for r in REAL])
def test_truncated_files_are_one_line_errors(reader, src, rel, fs, n, lsb, fraction, tmp_path):
    data = (src / rel).read_bytes()
    (tmp_path / rel).write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(RecordError) as info:
        reader.read_record(tmp_path, rel)
    assert info.value.path == rel and "\n" not in str(info.value)
    assert not _leaks(identifying_values(src / rel), str(info.value))


def test_dicom_reading_emits_no_warning_or_log_with_values(tmp_path, caplog, recwarn):
    with warnings.catch_warnings():  # pydicom, in the test's own parse, warns of invalid UIDs
        warnings.simplefilter("ignore")
        values = identifying_values(DICOM / "ECGToolkit_Example.dcm")
    shutil.copy(DICOM / "ECGToolkit_Example.dcm", tmp_path / "e.dcm")  # has invalid UIDs
    recwarn.clear()
    with caplog.at_level("DEBUG"):
        dicom_ecg.read_record(tmp_path, "e.dcm")
    emitted = " ".join([r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn])
    assert not _leaks(values, emitted)
