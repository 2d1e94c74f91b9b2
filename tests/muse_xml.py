"""A writer of synthetic GE MUSE RestingECG XML files with known samples, for the MUSE reader's
tests (the real samples may not be bundled): ISO-8859-1, the restecg.dtd DOCTYPE line, a Median
and a Rhythm waveform, base64 int16 little-endian leads with their CRC-32, and optional
demographic blocks holding made-up values only."""

from __future__ import annotations

import base64
import zlib
from pathlib import Path

import numpy as np

MUSE_LEADS = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")  # what MUSE stores


def muse_samples(n: int = 5000, seed: int = 0) -> dict[str, np.ndarray]:
    """int16 samples per stored lead: a different waveform each, with peaks of a few hundred
    units (about 1-2 mV at 4.88 µV per bit)."""
    t = np.arange(n) / 500.0
    rng = np.random.default_rng(seed)
    return {
        name: np.round(
            200 * np.sin(2 * np.pi * (1 + k) * 0.7 * t + k) + 10 * rng.normal(size=n)
        ).astype(np.int16)
        for k, name in enumerate(MUSE_LEADS)
    }


def _lead_xml(name: str, x: np.ndarray, uv_per_bit: float, units: str, crc: int | None) -> str:
    raw = x.astype("<i2").tobytes()
    crc_line = "" if crc is None else f"\n      <LeadDataCRC32>{crc}</LeadDataCRC32>"
    return f"""    <LeadData>
      <LeadByteCountTotal>{len(raw)}</LeadByteCountTotal>
      <LeadTimeOffset>0</LeadTimeOffset>
      <LeadSampleCountTotal>{len(x)}</LeadSampleCountTotal>
      <LeadAmplitudeUnitsPerBit>{uv_per_bit}</LeadAmplitudeUnitsPerBit>
      <LeadAmplitudeUnits>{units}</LeadAmplitudeUnits>
      <LeadHighLimit>32767</LeadHighLimit>
      <LeadLowLimit>-32768</LeadLowLimit>
      <LeadID>{name}</LeadID>
      <LeadOffsetFirstSample>0</LeadOffsetFirstSample>
      <FirstSampleBaseline>0</FirstSampleBaseline>
      <LeadSampleSize>2</LeadSampleSize>{crc_line}
      <WaveFormData>{base64.encodebytes(raw).decode("ascii")}</WaveFormData>
    </LeadData>
"""


def _waveform(kind: str, leads: dict[str, np.ndarray], fs: int, uv: float, units: str, crc) -> str:
    body = "".join(
        _lead_xml(name, x, uv, units, None if crc is None else crc(name, x))
        for name, x in leads.items()
    )
    return f"""  <Waveform>
    <WaveformType>{kind}</WaveformType>
    <WaveformStartTime>0</WaveformStartTime>
    <NumberofLeads>{len(leads)}</NumberofLeads>
    <SampleType>CONTINUOUS_SAMPLES</SampleType>
    <SampleBase>{fs}</SampleBase>
    <SampleExponent>0</SampleExponent>
    <HighPassFilter>16</HighPassFilter>
    <LowPassFilter>150</LowPassFilter>
{body}  </Waveform>
"""


def demographics(patient_id: str, age: str = "47", sex: str = "FEMALE") -> str:
    """Made-up demographic, order and diagnosis blocks (every field a reader must drop too)."""
    return f"""  <PatientDemographics>
    <PatientID>{patient_id}</PatientID>
    <PatientAge>{age}</PatientAge>
    <AgeUnits>YEARS</AgeUnits>
    <DateofBirth>03-14-1977</DateofBirth>
    <Gender>{sex}</Gender>
    <PatientLastName>SYNTHLASTNAME</PatientLastName>
    <PatientFirstName>SYNTHFIRSTNAME</PatientFirstName>
  </PatientDemographics>
  <TestDemographics>
    <SiteName>SYNTHETIC HOSPITAL</SiteName>
    <AcquisitionTime>08:15:42</AcquisitionTime>
    <AcquisitionDate>06-30-2024</AcquisitionDate>
    <CartNumber>77</CartNumber>
  </TestDemographics>
  <Order>
    <RequisitionNumber>SYNTHREQ0042</RequisitionNumber>
    <HISAccountNumber>SYNTHACC0042</HISAccountNumber>
  </Order>
  <Diagnosis>
    <Modality>RESTING</Modality>
    <DiagnosisStatement><StmtText>Sinus rhythm</StmtText></DiagnosisStatement>
    <DiagnosisStatement><StmtText>Confirmed by SYNTHDOCTOR M.D.</StmtText></DiagnosisStatement>
  </Diagnosis>
"""


def muse_xml(
    leads: dict[str, np.ndarray] | None = None,
    *,
    fs: int = 500,
    uv_per_bit: float = 4.88,
    units: str = "MICROVOLTS",
    patient: str | None = None,
    crc=lambda name, x: zlib.crc32(x.astype("<i2").tobytes()),
) -> bytes:
    """A MUSE XML document (ISO-8859-1 bytes): the Rhythm waveform holds ``leads`` (default
    ``muse_samples()``), a Median one their first 600 samples; demographics when ``patient`` is
    given; ``crc(name, samples) -> int`` gives each LeadDataCRC32 (None: no CRC elements)."""
    leads = muse_samples() if leads is None else leads
    median = {name: x[:600] for name, x in leads.items()}
    blocks = demographics(patient) if patient is not None else ""
    text = (
        '<?xml version="1.0" encoding="ISO-8859-1"?>\n'
        '<!DOCTYPE RestingECG SYSTEM "restecg.dtd">\n'
        "<RestingECG>\n  <MuseInfo><MuseVersion>9.0.9.18167</MuseVersion></MuseInfo>\n"
        f"{blocks}"
        f"{_waveform('Median', median, fs, uv_per_bit, units, crc)}"
        f"{_waveform('Rhythm', leads, fs, uv_per_bit, units, crc)}"
        "</RestingECG>\n"
    )
    return text.encode("iso-8859-1")


def write_muse(path: Path, **kwargs) -> Path:
    """``muse_xml(**kwargs)`` written to ``path`` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(muse_xml(**kwargs))
    return path
