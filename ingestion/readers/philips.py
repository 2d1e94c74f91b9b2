"""Philips resting-ECG XML exports (SierraECG 1.03, PhilipsECG 1.04 / 1.04.01 / 1.04.02): one
record per file, the 12 leads in millivolts.

A file is recognised by its content (root element ``restingecgdata``, namespace
``http://www3.medical.philips.com``), not by its extension; UTF-8 and UTF-16 (with BOM) files
read alike. The rate comes from ``signalcharacteristics/samplingrate``, the resolution (µV per
LSB) from ``signalresolution`` (1.03) or ``resolution`` (1.04), the lead names from the
``leadlabels`` of ``<parsedwaveforms>`` or, without them, from the acquisition type (STD-12 and
10-WIRE: the standard 12 leads). The samples are base64 int16 little-endian, one lead after the
other, or XLI-compressed (``compressmethod``/``compression`` ``XLI``): those are decompressed in
memory by the ``sierraecg`` package (``sierraecg.xli.xli_decode``, no temporary file) and the
limb leads III, aVR, aVL and aVF, which XLI stores as residuals from I and II, rebuilt as the
vendor's reference reader does.

Allow-list (``ingestion.readers.clinical``): only ``patient/generalpatientdata/patientid`` (the
raw identifier, pseudonymised by the store writer), ``sex`` and the age (``age/years``, else
``age/dateofbirth`` with the ``dataacquisition`` date, the dates then dropped; whole years,
capped at 90) are read. Of the interpretation only the statement codes of ``PHILIPS_TO_SNOMED``
are kept, as SNOMED codes; the statement texts and every other field — names, dates, operators,
institutions, machine ids, order fields, user-defined fields — are never read.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from pathlib import Path
from xml.etree.ElementTree import Element

import numpy as np

from ecgplat.labels import codes_to_multihot
from ecgplat.leads import LEADS, canonical_lead
from ingestion.readers import clinical
from ingestion.readers.options import ReadOptions, check_length
from ingestion.readers.record import RawRecord, RecordError, parse_sex

SOURCE = "philips"
NAMESPACE = "http://www3.medical.philips.com"
ROOT = "restingecgdata"
VERSIONS = {"SierraECG": ("1.03",), "PhilipsECG": ("1.04", "1.04.01", "1.04.02")}
STANDARD_LEAD_SETS = ("STD-12", "10-WIRE")  # acquisition types whose channels are the 12 leads
XLI_CHANNELS = 16  # an XLI payload holds up to 16 channels; the ones past the leads are unused
# Philips statement codes with a clean SNOMED (CinC 2021 class) meaning; all others are dropped.
# SR: "sinus rhythm" (left statement of the samples) -> 426783006, the NSR class.
PHILIPS_TO_SNOMED = {"SR": "426783006"}


def list_records(src: Path) -> list[str]:
    """Paths (with extension) of the Philips XML files: ``src`` itself, or every one below it."""
    return clinical.list_xml_files(src, {f"{{{NAMESPACE}}}{ROOT}", ROOT})


def _find(elem: Element | None, path: str) -> Element | None:
    """``elem.find`` with every step of ``path`` in any namespace (``a/b`` -> ``{*}a/{*}b``)."""
    if elem is None:
        return None
    return elem.find("/".join(f"{{*}}{step}" for step in path.split("/")))


def _text(elem: Element | None, path: str) -> str:
    found = _find(elem, path)
    return (found.text or "").strip() if found is not None else ""


def check_version(rel: str, root: Element) -> None:
    """RecordError unless the document type and version are ones this reader knows."""
    if clinical.local_name(root.tag) != ROOT:
        raise RecordError(rel, f"not a Philips XML file (root element is not {ROOT})")
    kind = _text(root, "documentinfo/documenttype")
    version = _text(root, "documentinfo/documentversion")
    if version not in VERSIONS.get(kind, ()):
        raise RecordError(rel, f"unsupported Philips XML document {kind!r} version {version!r}")


def _positive(rel: str, text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RecordError(rel, f"{what} is missing or not a number") from None
    if not np.isfinite(value) or value <= 0:
        raise RecordError(rel, f"{what} is not a positive number")
    return value


def signal_layout(rel: str, root: Element, waves: Element) -> tuple[float, float, list[str], int]:
    """The rate (Hz), mV per LSB, lead names and samples per lead told by the header."""
    chars = _find(root, "dataacquisition/signalcharacteristics")
    rate = _text(chars, "samplingrate") or waves.get("samplespersecond", "")
    fs = _positive(rel, rate, "sampling rate")
    resolution = (
        _text(chars, "signalresolution") or _text(chars, "resolution") or waves.get("resolution")
    )
    mv_per_lsb = _positive(rel, resolution or "", "signal resolution") * 1e-3  # µV -> mV
    labels = waves.get("leadlabels", "").split()
    if not labels and _text(chars, "acquisitiontype") in STANDARD_LEAD_SETS:
        labels = list(LEADS)
    if not labels:
        raise RecordError(rel, "no lead labels and an unknown acquisition type")
    count = waves.get("numberofleads") or _text(chars, "numberchannelsallocated")
    if count:
        labels = labels[: int(_positive(rel, count, "lead count"))]
    duration_ms = _positive(rel, waves.get("durationperchannel", ""), "durationperchannel")
    return fs, mv_per_lsb, labels, int(round(duration_ms * fs / 1000.0))


def compression(waves: Element) -> str:
    """The compression method of ``<parsedwaveforms>``: "XLI", "" (none) or another name."""
    if waves.get("compressflag", "True").strip().lower() == "false":
        return ""
    method = waves.get("compressmethod") or waves.get("compression") or ""
    return "" if method.strip().lower() in ("", "uncompressed", "none") else method.strip()


def payload(rel: str, waves: Element) -> bytes | np.ndarray:
    """The samples as stored: base64-decoded bytes, or the integers of a Plain encoding."""
    encoding = waves.get("dataencoding", "Base64").strip().lower()
    text = waves.text or ""
    if encoding == "plain":
        try:
            return np.array(text.split(), dtype=np.int64)
        except (ValueError, OverflowError):
            raise RecordError(rel, "plain waveform data holds a non-integer") from None
    if encoding != "base64":
        raise RecordError(rel, f"unsupported waveform data encoding {encoding!r}")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RecordError(rel, "waveform data is not valid base64 (truncated or damaged)") from None


def xli_prefix(rel: str, data: bytes, n_leads: int) -> bytes:
    """The part of an XLI payload holding its first ``n_leads`` chunks (each an 8-byte header
    whose first 4 bytes give the size of the LZW data after it); RecordError when it is cut."""
    end = 0
    for _ in range(n_leads):
        size = int.from_bytes(data[end : end + 4], "little", signed=True)
        end += 8 + size
        if len(data) < end or size <= 0:
            raise RecordError(rel, "truncated XLI data (fewer leads than the header)")
    return data[:end]


def xli_leads(rel: str, data: bytes, labels: list[str], n: int) -> np.ndarray:
    """(leads, samples) int64 of an XLI payload, the limb leads rebuilt from their residuals."""
    from sierraecg.xli import xli_decode

    if len(data) > 2 * XLI_CHANNELS * n * 2 + 64 * XLI_CHANNELS:  # LZW expands by at most 10/8
        raise RecordError(rel, "XLI payload is larger than its samples can compress to")
    data = xli_prefix(rel, data, len(labels))
    try:
        chunks = xli_decode(data, labels)
    except Exception as e:  # noqa: BLE001 - the decoder raises many types on damaged data
        raise RecordError(rel, f"XLI data cannot be decompressed ({type(e).__name__})") from None
    if len(chunks) < len(labels) or any(len(c) != n for c in chunks[: len(labels)]):
        raise RecordError(rel, "truncated XLI data (fewer leads or samples than the header)")
    x = np.stack([np.asarray(c, dtype=np.int64) for c in chunks[: len(labels)]])
    names = [canonical_lead(label) for label in labels]
    if names[:6] == list(LEADS[:6]):  # III..aVF are stored as residuals (sierraecg.read_file)
        i, ii = x[0], x[1]
        x[2] = ii - i - x[2]
        x[3] = -x[3] - (i + ii) // 2
        x[4] = (i - x[2]) // 2 - x[4]
        x[5] = (ii + x[2]) // 2 - x[5]
    return x


def plain_leads(rel: str, data: bytes | np.ndarray, n_leads: int, n: int) -> np.ndarray:
    """(leads, samples) of uncompressed data: int16 little-endian bytes or Plain integers."""
    if isinstance(data, bytes):
        data = np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2")
    values = data
    if values.size < n_leads * n:
        raise RecordError(rel, f"truncated waveform data ({values.size} of {n_leads * n} samples)")
    return values[: n_leads * n].astype(np.int64).reshape(n_leads, n)


def patient_age(root: Element, patient: Element | None) -> float:
    """Whole years, capped: ``age/years``, else from the birth and acquisition dates."""
    years = _text(patient, "age/years")
    if years:
        try:
            return clinical.safe_age(float(years))
        except ValueError:
            pass
    acquisition = _find(root, "dataacquisition")
    try:
        birth = dt.date.fromisoformat(_text(patient, "age/dateofbirth"))
        acquired = dt.date.fromisoformat("" if acquisition is None else acquisition.get("date", ""))
    except ValueError:
        return float("nan")
    return clinical.age_from_dates(birth, acquired)


def statement_codes(root: Element) -> list[str]:
    """SNOMED codes of the interpretation's statement codes that ``PHILIPS_TO_SNOMED`` maps."""
    codes = []
    for elem in root.iterfind(".//{*}interpretation/{*}statement/{*}statementcode"):
        code = PHILIPS_TO_SNOMED.get((elem.text or "").strip().upper())
        if code and code not in codes:
            codes.append(code)
    return codes


def read_record(src: Path, rel: str, opts: ReadOptions | None = None) -> RawRecord:
    """Read one Philips XML file (``rel`` below ``src``): the leads in float32 mV, the
    allow-listed patient fields and the mapped statement codes."""
    opts = opts or ReadOptions()
    root = clinical.load_xml(src, rel, opts)
    check_version(rel, root)
    waves = _find(root, "waveforms/parsedwaveforms")
    if waves is None:
        waves = root.find(".//{*}parsedwaveforms")
    if waves is None:
        raise RecordError(rel, "no parsedwaveforms element in the file")
    fs, mv_per_lsb, labels, n = signal_layout(rel, root, waves)
    check_length(rel, fs, n, opts)
    if n <= 0:
        raise RecordError(rel, "durationperchannel gives no samples")
    method, data = compression(waves), payload(rel, waves)
    if method == "XLI" and isinstance(data, bytes):
        x = xli_leads(rel, data, labels, n)
    elif not method:
        x = plain_leads(rel, data, len(labels), n)
    else:
        raise RecordError(rel, f"unsupported waveform compression {method!r}")
    patient = _find(root, "patient/generalpatientdata")
    codes = statement_codes(root)
    return clinical.file_record(
        SOURCE,
        rel,
        signal=(x.astype(np.float64) * mv_per_lsb).astype(np.float32),
        fs=fs,
        lead_names=[canonical_lead(label) or label for label in labels],
        codes=codes,
        labels=codes_to_multihot(codes),
        patient_id=_text(patient, "patientid") or None,
        age=patient_age(root, patient),
        sex=parse_sex(_text(patient, "sex")),
        extra={"derived_leads": []},
    )
