"""GE MUSE RestingECG XML exports: one record per file, the Rhythm waveform in millivolts.

A file is recognised by its content (root element ``RestingECG``), not by its extension; MUSE
writes ISO-8859-1 with a ``DOCTYPE restecg.dtd`` line, which is never fetched
(``ingestion.readers.clinical.parse_xml``). The signal is the ``<Waveform>`` whose
``WaveformType`` is ``Rhythm`` (the ``Median`` beat is ignored): per ``<LeadData>`` the samples
are base64 int16 little-endian, scaled by ``LeadAmplitudeUnitsPerBit`` in
``LeadAmplitudeUnits`` (MICROVOLTS, MILLIVOLTS, ...); the sampling rate is
``SampleBase * 10**SampleExponent``. ``LeadDataCRC32``, when present, is the CRC-32 of the
decoded bytes of the lead and must match. MUSE stores only I, II and V1-V6: a missing III, aVR,
aVL or aVF is derived from I and II (Einthoven and Goldberger: III = II - I,
aVR = -(I + II) / 2, aVL = I - II / 2, aVF = II - I / 2) and its name listed in
``RawRecord.extra["derived_leads"]``.

Allow-list (``ingestion.readers.clinical``): only ``PatientDemographics/PatientID`` (the raw
identifier, pseudonymised by the store writer), ``Gender`` and the age (``PatientAge`` with
``AgeUnits``, else ``DateofBirth`` with ``TestDemographics/AcquisitionDate``, the dates then
dropped; whole years, capped at 90) are read. Every demographic block is optional. Nothing else —
names, dates, times, sites, order and account numbers, cart ids — is read, and the diagnosis
statements, free text only in MUSE, are dropped (no codes).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import zlib
from pathlib import Path
from xml.etree.ElementTree import Element

import numpy as np

from ecgplat.leads import LEADS, canonical_lead
from ingestion.readers import clinical
from ingestion.readers.options import ReadOptions, check_length, check_rate
from ingestion.readers.record import RawRecord, RecordError, parse_sex, unit_scale_to_mv

SOURCE = "muse"
ROOT = "RestingECG"
# LeadAmplitudeUnits spellings -> the units of record.unit_scale_to_mv
_UNITS = {"MICROVOLTS": "uV", "MILLIVOLTS": "mV", "NANOVOLTS": "nV", "VOLTS": "V"}
# AgeUnits -> units per year
_AGE_UNITS = {"YEARS": 1.0, "MONTHS": 12.0, "WEEKS": 52.1775, "DAYS": 365.25, "HOURS": 8766.0}
# leads derived from I and II when the file lacks them: name -> (weight of I, weight of II)
DERIVED = {"III": (-1.0, 1.0), "aVR": (-0.5, -0.5), "aVL": (1.0, -0.5), "aVF": (-0.5, 1.0)}


def list_records(src: Path) -> list[str]:
    """Paths (with extension) of the MUSE XML files: ``src`` itself, or every one below it."""
    return clinical.list_xml_files(src, {ROOT})


def _text(elem: Element | None, path: str) -> str:
    """The stripped text of ``elem``'s child at ``path`` ("" when either is missing)."""
    if elem is None:
        return ""
    return (elem.findtext(path) or "").strip()


def _number(rel: str, elem: Element, path: str, what: str) -> float:
    try:
        return float(_text(elem, path))
    except ValueError:
        raise RecordError(rel, f"{what} is missing or not a number") from None


def rhythm_waveform(rel: str, root: Element) -> Element:
    """The ``<Waveform>`` of type Rhythm; RecordError when there is none."""
    for wave in root.iter("Waveform"):
        if _text(wave, "WaveformType").lower() == "rhythm":
            return wave
    raise RecordError(rel, "no Rhythm waveform in the file")


def sampling_rate(rel: str, wave: Element) -> float:
    """``SampleBase * 10**SampleExponent`` of a waveform, in Hz."""
    base = _number(rel, wave, "SampleBase", "SampleBase")
    exponent = _text(wave, "SampleExponent") or "0"
    try:
        return base * 10.0 ** int(exponent)
    except (ValueError, OverflowError):
        raise RecordError(rel, "SampleExponent is not an integer") from None


def lead_scale(rel: str, lead: Element, name: str) -> float:
    """Millivolts per bit of one ``<LeadData>``."""
    per_bit = _number(rel, lead, "LeadAmplitudeUnitsPerBit", f"lead {name}: amplitude per bit")
    unit = _text(lead, "LeadAmplitudeUnits").upper() or "MICROVOLTS"
    factor = unit_scale_to_mv(_UNITS.get(unit))
    if factor is None or not np.isfinite(per_bit) or per_bit <= 0:
        raise RecordError(rel, f"lead {name}: unsupported amplitude unit or scale")
    return per_bit * factor


def lead_samples(rel: str, lead: Element, name: str) -> np.ndarray:
    """The int16 samples of one ``<LeadData>``, its byte count and CRC-32 checked."""
    text = "".join(_text(lead, "WaveFormData").split())
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RecordError(rel, f"lead {name}: waveform data is not valid base64") from None
    count = _text(lead, "LeadSampleCountTotal")
    expected = _text(lead, "LeadByteCountTotal") or (str(2 * int(count)) if count.isdigit() else "")
    if expected.isdigit() and len(raw) != int(expected):
        raise RecordError(
            rel, f"lead {name}: truncated waveform data ({len(raw)} of {expected} bytes)"
        )
    if not raw or len(raw) % 2:
        raise RecordError(rel, f"lead {name}: truncated waveform data ({len(raw)} bytes)")
    crc = _text(lead, "LeadDataCRC32")
    if crc and (not crc.isdigit() or int(crc) != zlib.crc32(raw)):
        raise RecordError(rel, f"lead {name}: LeadDataCRC32 does not match the data")
    return np.frombuffer(raw, dtype="<i2")


def expected_samples(rel: str, leads: list[Element], fs: float, opts: ReadOptions) -> None:
    """The duration check of ``opts`` from the header fields, before any sample is decoded."""
    counts = [_text(lead, "LeadSampleCountTotal") for lead in leads]
    sizes = [len(_text(lead, "WaveFormData")) * 3 // 8 for lead in leads]  # base64 -> int16
    n = max(int(c) if c.isdigit() else s for c, s in zip(counts, sizes, strict=True))
    check_length(rel, fs, n, opts)


def read_leads(rel: str, wave: Element, opts: ReadOptions) -> tuple[float, dict[str, np.ndarray]]:
    """The rate and the measured leads (name -> float64 mV) of the Rhythm waveform."""
    fs = sampling_rate(rel, wave)
    check_rate(rel, fs, opts)
    leads = wave.findall("LeadData")
    if not leads:
        raise RecordError(rel, "the Rhythm waveform has no lead data")
    expected_samples(rel, leads, fs, opts)
    out: dict[str, np.ndarray] = {}
    for i, lead in enumerate(leads):
        raw_name = _text(lead, "LeadID") or f"lead{i + 1}"
        name = canonical_lead(raw_name) or raw_name
        if name in out:
            raise RecordError(rel, f"lead {name} is stored twice")
        samples = lead_samples(rel, lead, name)
        out[name] = samples.astype(np.float64) * lead_scale(rel, lead, name)
    if len({len(x) for x in out.values()}) != 1:
        raise RecordError(rel, "the leads of the Rhythm waveform differ in length")
    return fs, out


def derive_limb_leads(leads: dict[str, np.ndarray]) -> list[str]:
    """Add to ``leads`` (in place) the limb leads of ``DERIVED`` it lacks, computed from I and
    II; the names added (none without both I and II)."""
    if "I" not in leads or "II" not in leads:
        return []
    added = []
    for name, (w1, w2) in DERIVED.items():
        if name not in leads:
            leads[name] = w1 * leads["I"] + w2 * leads["II"]
            added.append(name)
    return added


def _date(text: str) -> dt.date | None:
    """A MUSE date (MM-DD-YYYY), None when missing or masked."""
    try:
        return dt.datetime.strptime(text, "%m-%d-%Y").date()
    except ValueError:
        return None


def patient_age(root: Element) -> float:
    """Whole years, capped: from PatientAge and AgeUnits, else from the birth and acquisition
    dates (which are not kept)."""
    patient = root.find("PatientDemographics")
    text = _text(patient, "PatientAge")
    per_year = _AGE_UNITS.get(_text(patient, "AgeUnits").upper() or "YEARS")
    if text and per_year:
        try:
            return clinical.safe_age(float(text) / per_year)
        except ValueError:
            pass
    birth = _date(_text(patient, "DateofBirth"))
    acquired = _date(_text(root.find("TestDemographics"), "AcquisitionDate"))
    return clinical.age_from_dates(birth, acquired)


def demographics(root: Element) -> dict:
    """The allow-listed patient fields of ``RawRecord``: raw id, age, sex."""
    patient = root.find("PatientDemographics")
    return {
        "patient_id": _text(patient, "PatientID") or None,
        "age": patient_age(root),
        "sex": parse_sex(_text(patient, "Gender")),
    }


def read_record(src: Path, rel: str, opts: ReadOptions | None = None) -> RawRecord:
    """Read one MUSE XML file (``rel`` below ``src``): the Rhythm leads in float32 mV, the limb
    leads MUSE leaves out derived, and the allow-listed patient fields."""
    opts = opts or ReadOptions()
    root = clinical.load_xml(src, rel, opts)
    if clinical.local_name(root.tag) != ROOT:
        raise RecordError(rel, f"not a GE MUSE XML file (root element is not {ROOT})")
    fs, leads = read_leads(rel, rhythm_waveform(rel, root), opts)
    derived = derive_limb_leads(leads)
    order = sorted(leads, key=lambda n: (LEADS.index(n) if n in LEADS else len(LEADS), n))
    signal = np.stack([leads[n] for n in order]).astype(np.float32)
    if not np.isfinite(signal).all():
        raise RecordError(rel, "signal contains NaN or infinite values")
    fields = demographics(root)
    extra = {"derived_leads": derived}
    return clinical.file_record(
        SOURCE, rel, signal=signal, fs=fs, lead_names=order, extra=extra, **fields
    )
