"""The SCP-ECG and EDF/EDF+ readers: the SCP decoder (ours, from EN 1064) against the same
recording in HL7 aECG, its refusals (truncation, sections past the end, CRC, unsupported
encodings), EDF scaling, channel choice, EDF+D gaps and header/size checks on files written
here, and the allow-lists (identifying values read from the samples, never written in the repo).
"""

import os
import struct
from pathlib import Path

import numpy as np
import pytest
from defusedxml.ElementTree import parse
from edf_files import Channel, write_edf

from ecgplat.leads import LEADS
from ingestion.readers import edf, scp_ecg
from ingestion.readers.record import RecordError
from ingestion.readers.scp_sections import HEADER, crc_ccitt, patient_tags

SAMPLES = Path(__file__).parents[1] / "data" / "samples" / "hospital"
SCP_DIR = SAMPLES / "scp_ecg"
SCP = "ECGToolkit_Example.scp"
HL7_NAME = "hl7_aecg/FDA_HL7_Example_aECG.xml"
QUANTUM_MV = 2500e-6  # the sample's amplitude step: 2500 nV
HL7 = "{urn:hl7-org:v3}"


def hospital_file(name: str) -> Path:
    """A shared hospital sample: the bundled copy, else ``$ECGPLAT_HOSPITAL_DATA``; skips
    when neither has it."""
    if (SAMPLES / name).is_file():
        return SAMPLES / name
    root = os.environ.get("ECGPLAT_HOSPITAL_DATA")
    if not root:
        pytest.skip(f"{name} is not bundled and ECGPLAT_HOSPITAL_DATA is not set")
    path = Path(root) / name
    if not path.is_file():
        pytest.skip(f"{name} is missing from ECGPLAT_HOSPITAL_DATA")
    return path


def hl7_rhythm(path: Path) -> dict[str, np.ndarray]:
    """lead -> mV of the RHYTHM series of an HL7 aECG (a minimal parse, for the comparison)."""
    root = parse(path).getroot()
    series = next(
        s for s in root.iter(f"{HL7}series") if s.find(f"{HL7}code").get("code") == "RHYTHM"
    )
    out = {}
    for seq in series.findall(f"{HL7}component/{HL7}sequenceSet/{HL7}component/{HL7}sequence"):
        code = seq.find(f"{HL7}code").get("code")
        if not code.startswith("MDC_ECG_LEAD_"):
            continue
        value = seq.find(f"{HL7}value")
        scale = float(value.find(f"{HL7}scale").get("value"))
        origin = float(value.find(f"{HL7}origin").get("value"))
        digits = np.array(value.find(f"{HL7}digits").text.split(), dtype=float)
        out[code.removeprefix("MDC_ECG_LEAD_").replace("AV", "aV")] = digits * scale + origin
    return {k: v / 1000.0 for k, v in out.items()}  # µV -> mV


@pytest.fixture(scope="module")
def scp_record():
    return scp_ecg.read_record(SCP_DIR, SCP)


# --- SCP-ECG ----------------------------------------------------------------------------------


def test_scp_sample_is_12_leads_at_500_hz(scp_record):
    rec = scp_record
    assert rec.source == "scp" and rec.record_id == "ECGToolkit_Example" and rec.path == SCP
    assert rec.signal.dtype == np.float32 and rec.signal.shape == (12, 5000)
    assert rec.fs == 500.0 and sorted(rec.lead_names) == sorted(LEADS)
    assert rec.sex in ("M", "F") and 0 <= rec.age <= 90 and rec.age == int(rec.age)
    assert rec.patient_id


def test_scp_decode_agrees_with_the_same_recording_in_hl7(scp_record):
    hl7 = hl7_rhythm(hospital_file(HL7_NAME))
    assert set(hl7) == set(LEADS)
    worst = 0.0
    for row, lead in enumerate(scp_record.lead_names):
        ours, theirs = scp_record.signal[row].astype(np.float64), hl7[lead]
        assert ours.shape == theirs.shape == (5000,)
        lags = range(-25, 26)  # alignment: the best lag must be none
        errors = [np.abs(np.roll(ours, lag) - theirs)[30:-30].mean() for lag in lags]
        assert lags[int(np.argmin(errors))] == 0, lead
        worst = max(worst, float(np.abs(ours - theirs).max()))
    assert worst <= QUANTUM_MV / 2, f"max |SCP - HL7| {worst} mV exceeds half a quantum"


def test_scp_decode_agrees_with_the_same_recording_in_dicom(scp_record):
    import pydicom

    ds = pydicom.dcmread(hospital_file("dicom_ecg/ECGToolkit_Example.dcm"))
    group = ds.WaveformSequence[0]
    assert group.MultiplexGroupLabel == "RHYTHM" and float(group.SamplingFrequency) == 500
    values = ds.waveform_array(0)  # (samples, channels), the channels' units
    for col, channel in enumerate(group.ChannelDefinitionSequence):
        lead = channel.ChannelSourceSequence[0].CodeMeaning.removeprefix("Lead ")
        assert channel.ChannelSensitivityUnitsSequence[0].CodeValue == "uV"
        ours = scp_record.signal[scp_record.lead_names.index(lead)].astype(np.float64)
        assert np.abs(ours - values[:, col] / 1000.0).max() <= QUANTUM_MV / 2, lead


def test_scp_einthoven_and_amplitude(scp_record):
    x = dict(zip(scp_record.lead_names, scp_record.signal.astype(np.float64), strict=True))
    assert np.abs(x["I"] + x["III"] - x["II"]).max() <= 2 * QUANTUM_MV
    assert 0.3 <= np.ptp(x["II"]) <= 8.0


def test_scp_found_by_content_not_extension(tmp_path):
    data = (SCP_DIR / SCP).read_bytes()
    (tmp_path / "no_extension").write_bytes(data)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "named.xml").write_bytes(data)
    (tmp_path / "fake.scp").write_bytes(b"\0" * 100)
    (tmp_path / "short.scp").write_bytes(b"ab")
    assert scp_ecg.list_records(tmp_path) == ["no_extension", "sub/named.xml"]
    rec = scp_ecg.read_record(tmp_path, "no_extension")
    assert rec.record_id == "no_extension" and rec.signal.shape == (12, 5000)


def _sections(data: bytes) -> dict[int, tuple[int, int]]:
    """section id -> (0-based start, length) from section 0's pointers."""
    length = struct.unpack_from("<I", data, 10)[0]
    out = {}
    for pos in range(6 + HEADER, 6 + length, 10):
        sid, slen, index = struct.unpack_from("<HII", data, pos)
        if slen:
            out[sid] = (index - 1, slen)
    return out


def _patched(data: bytes, offset: int, new: bytes) -> bytes:
    """``data`` with ``new`` at ``offset`` and the CRCs of its section and the record redone,
    so that only the change itself can make the reader refuse the file."""
    out = bytearray(data)
    out[offset : offset + len(new)] = new
    for start, length in _sections(bytes(out)).values():
        if start <= offset < start + length:
            out[start : start + 2] = struct.pack("<H", crc_ccitt(out[start + 2 : start + length]))
    out[0:2] = struct.pack("<H", crc_ccitt(out[2:]))
    return bytes(out)


def _refused(tmp_path: Path, data: bytes) -> str:
    (tmp_path / "bad.scp").write_bytes(data)
    with pytest.raises(RecordError) as info:
        scp_ecg.read_record(tmp_path, "bad.scp")
    assert "\n" not in str(info.value) and info.value.path == "bad.scp"
    return info.value.reason


def test_scp_truncated_file_is_refused(tmp_path):
    data = (SCP_DIR / SCP).read_bytes()
    assert "truncated" in _refused(tmp_path, data[: len(data) // 2])
    assert "truncated" in _refused(tmp_path, data[:10])


def test_scp_section_length_past_the_end_is_refused_before_allocating(tmp_path):
    data = (SCP_DIR / SCP).read_bytes()
    pointers = 6 + HEADER
    six = next(p for p in range(pointers, pointers + 120, 10) if data[p : p + 2] == b"\x06\x00")
    huge = struct.pack("<I", 0x7FFFFFF0)
    assert "past the end of the file" in _refused(tmp_path, _patched(data, six + 2, huge))
    start, _ = _sections(data)[6]  # the section's own header says so too (pointer left alone)
    reason = _refused(tmp_path, _patched(data, start + 4, huge))
    assert "past the end of the file" in reason or "disagrees" in reason


def test_scp_crc_mismatch_is_refused(tmp_path):
    data = bytearray((SCP_DIR / SCP).read_bytes())
    flipped = bytes(data)
    flipped = bytes([flipped[0] ^ 0xFF]) + flipped[1:]
    assert "CRC mismatch" in _refused(tmp_path, flipped)
    start, length = _sections(bytes(data))[6]
    data[start + length // 2] ^= 0x01  # a data bit, the record CRC redone: the section's fails
    data[0:2] = struct.pack("<H", crc_ccitt(data[2:]))
    assert "section 6: CRC mismatch" in _refused(tmp_path, bytes(data))


def test_scp_unsupported_encodings_are_refused_with_a_reason(tmp_path):
    data = (SCP_DIR / SCP).read_bytes()
    six, _ = _sections(data)[6]
    assert "bimodal" in _refused(tmp_path, _patched(data, six + HEADER + 5, b"\x01"))
    three, _ = _sections(data)[3]
    flags = data[three + HEADER + 1] | 1
    reason = _refused(tmp_path, _patched(data, three + HEADER + 1, bytes([flags])))
    assert "reference beat subtraction" in reason
    two, _ = _sections(data)[2]
    assert "Huffman tables" in _refused(tmp_path, _patched(data, two + HEADER, b"\x01\x00"))


def test_scp_keeps_only_the_allow_list(scp_record):
    data = (SCP_DIR / SCP).read_bytes()
    start, length = _sections(data)[1]
    body = data[start + HEADER : start + length]
    # every text tag of section 1 (names, ids, device, institution...), read here from the file
    texts, pos = [], 0
    while pos + 3 <= len(body) and body[pos] != 255:
        tag, n = struct.unpack_from("<BH", body, pos)
        value = body[pos + 3 : pos + 3 + n].split(b"\0", 1)[0].decode("latin-1").strip()
        if tag not in (4, 5, 8, 25, 26) and len(value) >= 3:
            texts.append(value)
        pos += 3 + n
    assert texts, "the sample has identifying text tags to look for"
    tags = patient_tags(body)
    assert set(tags) <= {2, 4, 5, 8, 25}
    year, month, day = struct.unpack_from("<HBB", tags[5]) if 5 in tags else (0, 0, 0)
    shown = repr(scp_record) + str(scp_record.extra)
    for value in texts + [f"{year:04d}-{month:02d}-{day:02d}", f"{day:02d}.{month:02d}.{year}"]:
        assert value not in shown
    assert scp_record.patient_id == tags[2].split(b"\0", 1)[0].decode("latin-1").strip()
    assert scp_ecg.patient_hint(SCP_DIR, SCP) == scp_record.patient_id


# --- EDF / EDF+ -------------------------------------------------------------------------------


def _mixed_channels(n_records: int, fs: int = 500) -> list[Channel]:
    """An ECG lead II in µV at unit gain, a respiration channel, a V1 in mV at another gain."""
    rng = np.random.default_rng(0)
    n = n_records * fs
    return [
        Channel("Resp", rng.integers(-500, 500, n).astype(np.int16), fs, "mV", (-10, 10)),
        Channel("ECG II", rng.integers(-2000, 2000, n).astype(np.int16), fs, "uV"),
        Channel(
            "EKG-V1",
            rng.integers(-2048, 2048, n).astype(np.int16),
            fs,
            "mV",
            (-5, 5),
            (-2048, 2047),
        ),
        Channel("EEG Fpz-Cz", rng.integers(-100, 100, n).astype(np.int16), fs, "uV"),
    ]


def test_edf_exact_physical_values_and_ecg_channels_by_label(tmp_path):
    channels = _mixed_channels(12)
    write_edf(tmp_path / "mixed.edf", channels)
    rec = edf.read_record(tmp_path, "mixed.edf")
    assert rec.source == "edf" and rec.fs == 500.0 and rec.lead_names == ["II", "V1"]
    assert rec.signal.dtype == np.float32 and rec.signal.shape == (2, 6000)
    want_ii = (channels[1].digital.astype(np.float64) * 1e-3).astype(np.float32)  # unit gain µV
    assert np.array_equal(rec.signal[0], want_ii)
    want_v1 = channels[2].physical_values()  # mV, gain 10/4095
    np.testing.assert_allclose(rec.signal[1], want_v1, rtol=1e-6, atol=1e-7)
    ends = np.isin(channels[2].digital, (-2048, 2047))
    assert ends.any()
    assert set(np.round(rec.signal[1][ends], 6)) <= {-5.0, 5.0}


@pytest.mark.parametrize(
    ("label", "want"),
    [
        ("II", (True, "II")),
        ("ECG I", (True, "I")),
        ("EKG-V2", (True, "V2")),
        ("ecg lead aVR", (True, "aVR")),
        ("MLII", (True, "II")),
        ("ECG", (True, None)),
        ("ECG1", (True, None)),
        ("EEG Fpz-Cz", (False, None)),
        ("Resp", (False, None)),
    ],
)
def test_edf_labels(label, want):
    assert edf.ecg_lead(label) == want


def test_edf_lone_unnamed_ecg_is_lead_ii_and_ambiguous_ones_are_refused(tmp_path):
    sig = np.arange(-1000, 1000, dtype=np.int16)
    write_edf(tmp_path / "one.edf", [Channel("ECG", sig, 200), Channel("SpO2", sig, 200, "%")])
    rec = edf.read_record(tmp_path, "one.edf")
    assert rec.lead_names == ["II"] and rec.fs == 200.0
    write_edf(tmp_path / "two.edf", [Channel("ECG1", sig, 200), Channel("ECG2", sig, 200)])
    with pytest.raises(RecordError, match="2 ECG channels without a lead name"):
        edf.read_record(tmp_path, "two.edf")
    write_edf(tmp_path / "none.edf", [Channel("ECG", sig, 200, "%"), Channel("EEG", sig, 200)])
    with pytest.raises(RecordError, match="no ECG channel with a voltage dimension"):
        edf.read_record(tmp_path, "none.edf")


def test_edf_plus_d_reads_the_longest_contiguous_run(tmp_path):
    fs, n_records = 250, 9
    sig = np.arange(n_records * fs, dtype=np.int16)
    onsets = [0, 1, 2, 10, 11, 12, 13, 14, 15]  # runs of 3 and 6 records
    write_edf(tmp_path / "d.edf", [Channel("ECG V3", sig, fs)], plus="EDF+D", onsets=onsets)
    rec = edf.read_record(tmp_path, "d.edf")
    assert rec.lead_names == ["V3"] and rec.signal.shape == (1, 6 * fs)
    assert np.array_equal(rec.signal[0], (sig[3 * fs :] * 1e-3).astype(np.float32))
    # the same records written as EDF+C are read whole
    write_edf(tmp_path / "c.edf", [Channel("ECG V3", sig, fs)], plus="EDF+C")
    assert edf.read_record(tmp_path, "c.edf").signal.shape == (1, n_records * fs)
    back = [0, 1, 2, 3, 2.5, 6, 7, 8, 9]
    write_edf(tmp_path / "back.edf", [Channel("ECG V3", sig, fs)], plus="EDF+D", onsets=back)
    with pytest.raises(RecordError, match="overlap or go back in time"):
        edf.read_record(tmp_path, "back.edf")


@pytest.mark.parametrize(
    ("declared", "reason"),
    [(13, "truncated: header declares 13 data records"), (11, "disagrees"), (-1, "-1")],
)
def test_edf_record_count_disagreeing_with_file_size_is_refused(tmp_path, declared, reason):
    write_edf(tmp_path / "bad.edf", _mixed_channels(12), declared_records=declared)
    with pytest.raises(RecordError, match=reason):
        edf.read_record(tmp_path, "bad.edf")


def test_edf_found_by_content_not_extension(tmp_path):
    write_edf(tmp_path / "rec.dat", _mixed_channels(2))
    (tmp_path / "notes.edf").write_text("0       not an EDF header\n")
    assert edf.list_records(tmp_path) == ["rec.dat"]


def test_edf_written_by_edfio_keeps_only_the_allow_list(tmp_path):
    import datetime as dt

    from edfio import Edf, EdfSignal, Patient, Recording

    ecg = np.sin(np.linspace(0, 20, 5000)) * 1.5  # mV
    code, name, birth = "MCH-0042", "Doe_Jane", dt.date(1950, 6, 15)
    Edf(
        [
            EdfSignal(np.zeros(5000), 500, label="EEG C3-A2", physical_dimension="uV"),
            EdfSignal(ecg, 500, label="ECG I", physical_dimension="mV"),
        ],
        patient=Patient(code=code, sex="F", birthdate=birth, name=name),
        recording=Recording(
            startdate=dt.date(2020, 6, 14),
            hospital_administration_code="ADM77",
            investigator_technician_code="Tec",
        ),
    ).write(tmp_path / "by_edfio.edf")
    rec = edf.read_record(tmp_path, "by_edfio.edf")
    assert rec.lead_names == ["I"] and rec.fs == 500.0
    np.testing.assert_allclose(rec.signal[0], ecg, atol=1.5 * 2 / 65535 + 1e-6)
    assert (rec.patient_id, rec.sex, rec.age) == (code, "F", 69.0)
    shown = repr(rec) + str(rec.extra)
    for value in (code, name, "1950", "15-JUN-1950", "14-JUN-2020", "ADM77", "Tec"):
        assert value not in shown
    assert edf.patient_hint(tmp_path, "by_edfio.edf") == code


def test_plain_edf_patient_field_is_not_read(tmp_path):
    sig = np.arange(1000, dtype=np.int16)
    free_text = "Jane Doe born 1950 id 12345"
    write_edf(tmp_path / "plain.edf", [Channel("II", sig, 100)], plus="", patient=free_text)
    rec = edf.read_record(tmp_path, "plain.edf")
    assert (rec.patient_id, rec.sex) == (None, "") and np.isnan(rec.age)


@pytest.mark.parametrize(
    ("name", "n_samples"), [("edfReader_edfPlusC.edf", 20 * 200), ("edfReader_edfPlusD.edf", 1200)]
)
def test_edf_shared_samples(name, n_samples):
    """The GPL samples (not bundled): the synthetic 'ECG' channel among 11 signals as lead II at
    200 Hz; EDF+D: its records start at 0, 2, 4-9, 12, 15, 19 s -> the 6 s run of 4-9."""
    path = hospital_file(f"edf/{name}")
    rec = edf.read_record(path.parent, name)
    assert rec.lead_names == ["II"] and rec.fs == 200.0 and rec.signal.shape == (1, n_samples)
    head = path.read_bytes()[:256].decode("latin-1")
    shown = repr(rec) + str(rec.extra)
    for token in head[8:184].split():  # patient and recording identification, start date/time
        if len(token) >= 4 and token not in ("Startdate",):
            assert token not in shown, "a header field leaked into the record"
