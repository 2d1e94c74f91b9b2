"""DICOM ECG waveforms (12-lead, general, general 32-bit and ambulatory ECG waveform storage): one
record per file, the RHYTHM multiplex group in millivolts.

A file is recognised by its content, not its extension: a dataset (after the ``DICM`` preamble,
or a bare dataset starting at group 0002 or 0008) whose SOP class is one of ``ECG_SOP_CLASSES``.
It is read through pydicom with its own transfer syntax (implicit or explicit VR, little or big
endian; deflated and other syntaxes are refused before anything is decompressed). The signal is
the first ``WaveformSequence`` item labelled ``RHYTHM`` (the ``MEDIAN BEAT`` group is ignored;
an unlabelled file's first group that is not a median beat): its ``SamplingFrequency`` is the
rate, and each channel's value in millivolts is
``(sample * ChannelSensitivity * ChannelSensitivityCorrectionFactor + ChannelBaseline)`` in the
unit of its ``ChannelSensitivityUnitsSequence`` (uV, mV, V). A channel is named by its
``ChannelSourceSequence`` code (SCPECG ``5.6.3-9-<n>`` or MDC ``2:<n>``,
``clinical.SCP_LEAD_CODES``; else its code meaning such as ``Lead II``); channels that are not
one of the 12 standard leads are dropped, the first of a repeated lead is kept.

Memory is bounded before any sample is read: pydicom reads the dataset only up to the
``WaveformSequence``, and each multiplex group only up to its ``WaveformData``, whose position and
length are noted, not read. The chosen group's declared size (channels x samples x bits) must
match that length and its duration (samples / rate) fit ``ReadOptions.max_seconds``; only then
are exactly those bytes read.

Allow-list (``ingestion.readers.clinical``): only ``PatientID`` (the raw identifier, pseudonymised
by the store writer), ``PatientSex`` (M/F) and the age (``PatientAge``, else ``PatientBirthDate``
with the acquisition, content, series or study date; whole years, capped at 90; the dates are then
dropped) are read. Names, other dates and times, accession and admission numbers, institutions,
stations, physicians, UIDs, private tags and free text never reach the record. pydicom's warnings
and log lines quote element values and file names, so this module silences both.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from struct import unpack
from typing import BinaryIO

import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_file_meta_info, read_partial
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from ecgplat.leads import canonical_lead
from ingestion.readers.clinical import (
    SCP_LEAD_CODES,
    age_from_dates,
    compact_date,
    file_record,
    list_files,
    safe_age,
    source_root,
)
from ingestion.readers.options import ReadOptions, check_length, check_rate, inside_src
from ingestion.readers.record import RawRecord, RecordError, parse_sex, unit_scale_to_mv

SOURCE = "dicom"
ECG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.9.1.1",  # 12-lead ECG Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.1.2",  # General ECG Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.1.3",  # Ambulatory ECG Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.1.4",  # General 32-bit ECG Waveform Storage
}
TRANSFER_SYNTAXES = {
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
}
MAX_CHANNELS = 64  # per multiplex group (the IODs allow at most 24)
MAX_GROUPS = 64  # multiplex groups in one WaveformSequence
MAX_TAIL_ELEMENTS = 100_000  # top-level elements after it whose lengths are checked
DEFER_BYTES = 64 * 1024  # larger element values are left unread in the file
HEAD_BYTES = 4096  # what list_records reads of a file to find its SOP class
# (bits allocated, sample interpretation) -> sample type
SAMPLE_TYPES = {
    (8, "SB"): "i1",
    (8, "UB"): "u1",
    (16, "SS"): "i2",
    (16, "US"): "u2",
    (32, "SL"): "i4",
    (32, "UL"): "u4",
}
_WAVEFORM_SEQUENCE, _WAVEFORM_DATA = 0x54000100, 0x54001010
_ITEM, _SEQUENCE_END, _UNDEFINED = 0xFFFEE000, 0xFFFEE0DD, 0xFFFFFFFF
_SOP_CLASS = 0x00080016
_LONG_VRS = {str(vr).encode() for vr in EXPLICIT_VR_LENGTH_32}  # 4-byte length in explicit VR

# pydicom's messages quote element values (UIDs, names) and file names: keep them out of logs
logging.getLogger("pydicom").addFilter(lambda record: False)
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


# --- finding the files --------------------------------------------------------------------------


def sop_class(head: bytes) -> str | None:
    """The SOP class UID of the dataset whose first bytes are ``head`` (with or without the
    ``DICM`` preamble), or None when they do not start a DICOM dataset."""
    if head[128:132] != b"DICM" and head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return None
    try:
        ds = read_partial(
            io.BytesIO(head), stop_when=lambda tag, vr, n: tag > _SOP_CLASS, force=True
        )
        meta = getattr(ds, "file_meta", None)
        value = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
    except Exception:  # noqa: BLE001 - any unparseable head is simply not a DICOM ECG
        return None
    return str(value).strip() if value else None


def list_records(src: Path) -> list[str]:
    """Paths (with extension) of the DICOM ECG files: ``src`` itself, or every one below it."""
    return list_files(src, lambda head, _size: sop_class(head) in ECG_SOP_CLASSES, HEAD_BYTES)


# --- reading the header without the samples ----------------------------------------------------


@dataclass
class _Group:
    """One multiplex group: its elements up to ``WaveformData``, and where that lies."""

    header: Dataset
    offset: int | None  # file offset of the WaveformData value (None: no WaveformData)
    length: int  # its declared length in bytes


def _element_header(fp: BinaryIO, implicit: bool, little: bool) -> tuple[int, int]:
    """(tag, value length) of the data element starting at ``fp``; EOFError at the file's end."""
    endian = "<" if little else ">"
    raw = fp.read(8)
    if len(raw) < 8:
        raise EOFError
    group, element = unpack(f"{endian}HH", raw[:4])
    if implicit or group == 0xFFFE:
        return group << 16 | element, unpack(f"{endian}L", raw[4:])[0]
    if raw[4:6] in _LONG_VRS:
        more = fp.read(4)
        if len(more) < 4:
            raise EOFError
        return group << 16 | element, unpack(f"{endian}L", more)[0]
    return group << 16 | element, unpack(f"{endian}H", raw[6:])[0]


def _peek_tag(fp: BinaryIO, little: bool) -> int | None:
    where = fp.tell()
    raw = fp.read(4)
    fp.seek(where)
    if len(raw) < 4:
        return None
    group, element = unpack("<HH" if little else ">HH", raw)
    return group << 16 | element


def _read_group(fp: BinaryIO, implicit: bool, little: bool, item_length: int) -> _Group:
    """The multiplex group item at ``fp`` (after its item tag), read up to its WaveformData."""
    start, defined = fp.tell(), item_length != _UNDEFINED
    header = read_dataset(
        fp,
        implicit,
        little,
        bytelength=item_length if defined else None,
        stop_when=lambda tag, vr, n: tag == _WAVEFORM_DATA,
        defer_size=DEFER_BYTES,
        at_top_level=False,
    )
    offset, length = None, 0
    if _peek_tag(fp, little) == _WAVEFORM_DATA:
        _, length = _element_header(fp, implicit, little)
        if length == _UNDEFINED:
            raise ValueError("WaveformData of undefined length")
        offset = fp.tell()
        if not defined:  # skip the samples, then read on to the item's end
            fp.seek(offset + length)
            read_dataset(fp, implicit, little, defer_size=DEFER_BYTES, at_top_level=False)
    if defined:
        fp.seek(start + item_length)
    return _Group(header, offset, length)


def _scan(fp: BinaryIO, size: int, rel: str) -> tuple[Dataset, list[_Group]]:
    """The dataset up to the WaveformSequence and its multiplex groups (no samples read)."""
    ds = read_partial(fp, stop_when=lambda tag, vr, n: tag >= _WAVEFORM_SEQUENCE, force=True)
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        raise RecordError(rel, "not a readable DICOM file")
    if fp.tell() >= size:
        raise RecordError(rel, "no WaveformSequence before the end of the file (or truncated)")
    tag, length = _element_header(fp, implicit, little)
    if tag != _WAVEFORM_SEQUENCE:
        raise RecordError(rel, "no WaveformSequence")
    end = None if length == _UNDEFINED else fp.tell() + length
    groups: list[_Group] = []
    while end is None or fp.tell() < end:
        tag, item_length = _element_header(fp, True, little)
        if tag == _SEQUENCE_END:
            break
        if tag != _ITEM or len(groups) == MAX_GROUPS:
            raise RecordError(rel, "malformed WaveformSequence")
        groups.append(_read_group(fp, implicit, little, item_length))
        if fp.tell() > size:
            raise EOFError
    _check_tail(fp, size, implicit, little)
    return ds, groups


def _check_tail(fp: BinaryIO, size: int, implicit: bool, little: bool) -> None:
    """EOFError when a defined-length element after the WaveformSequence runs past the file's
    end (a truncated file), walking the element headers only; the values are skipped unread."""
    for _ in range(MAX_TAIL_ELEMENTS):
        if fp.tell() >= size:
            return
        _, length = _element_header(fp, implicit, little)
        if length == _UNDEFINED:
            return  # an undefined-length sequence: its items are not walked
        if fp.seek(fp.tell() + length) > size:
            raise EOFError


def _transfer_syntax_ok(file: Path, head: bytes, rel: str) -> None:
    """RecordError for a file-meta transfer syntax other than the uncompressed ones (a deflated
    dataset is refused before pydicom would inflate it whole)."""
    if head[128:132] != b"DICM":
        return
    try:
        syntax = read_file_meta_info(file).get("TransferSyntaxUID")
    except Exception:  # noqa: BLE001 - pydicom raises many types on a damaged file meta
        raise RecordError(rel, "unreadable DICOM file meta information") from None
    if syntax is not None and str(syntax) not in TRANSFER_SYNTAXES:
        raise RecordError(rel, "unsupported transfer syntax (uncompressed VR syntaxes only)")


def read_header(file: Path, rel: str) -> tuple[Dataset, list[_Group]]:
    """``_scan`` of ``file`` with its errors as RecordError (one line, no element value)."""
    with open(file, "rb") as fp:
        head = fp.read(HEAD_BYTES)
        size = fp.seek(0, os.SEEK_END)
        fp.seek(0)
        if sop_class(head) not in ECG_SOP_CLASSES:
            raise RecordError(rel, "not a DICOM ECG waveform (SOP class)")
        _transfer_syntax_ok(file, head, rel)
        try:
            return _scan(fp, size, rel)
        except RecordError:
            raise
        except EOFError:
            raise RecordError(rel, "file truncated in the WaveformSequence") from None
        except Exception as e:  # noqa: BLE001 - pydicom raises many types on damaged files
            raise RecordError(rel, f"unreadable DICOM waveform ({type(e).__name__})") from None


# --- the rhythm group --------------------------------------------------------------------------


def _label(group: _Group) -> str:
    return " ".join(str(group.header.get("MultiplexGroupLabel", "") or "").upper().split())


def rhythm_group(groups: list[_Group], rel: str) -> _Group:
    """The group labelled RHYTHM, else the first one not labelled as a median beat."""
    for group in groups:
        if _label(group) == "RHYTHM":
            return group
    for group in groups:
        if "MEDIAN" not in _label(group) and "BEAT" not in _label(group):
            return group
    raise RecordError(rel, "no RHYTHM multiplex group")


def _code_lead(code: Dataset) -> str | None:
    """The canonical lead of a ChannelSourceSequence code (SCPECG, MDC, or its meaning)."""
    scheme = str(code.get("CodingSchemeDesignator", "") or "").strip().upper()
    value = str(code.get("CodeValue", "") or "").strip()
    number = None
    if scheme == "SCPECG" and value.startswith("5.6.3-9-"):
        number = value.rpartition("-")[2]
    elif scheme == "MDC" and value.startswith("2:"):
        number = value[2:]
    if number is not None and number.isdigit():
        return SCP_LEAD_CODES.get(int(number))
    meaning = str(code.get("CodeMeaning", "") or "").split("(")[0].strip()
    return canonical_lead(meaning.removeprefix("Lead ").removeprefix("lead "))


def _channel_scale(channel: Dataset, lead: str, rel: str) -> tuple[float, float]:
    """(millivolts per sample unit, baseline in millivolts) of one channel."""
    units = channel.get("ChannelSensitivityUnitsSequence")
    unit = str(units[0].get("CodeValue", "") or "") if units else ""
    factor = unit_scale_to_mv(unit) if unit else None
    sensitivity = channel.get("ChannelSensitivity")
    if factor is None or sensitivity in (None, ""):
        raise RecordError(rel, f"lead {lead} has no channel sensitivity in a voltage unit")
    correction = channel.get("ChannelSensitivityCorrectionFactor")
    baseline = channel.get("ChannelBaseline")
    gain = float(sensitivity) * (1.0 if correction in (None, "") else float(correction))
    offset = 0.0 if baseline in (None, "") else float(baseline)
    if not (math.isfinite(gain) and gain != 0 and math.isfinite(offset)):
        raise RecordError(rel, f"lead {lead} has an invalid channel sensitivity or baseline")
    return gain * factor, offset * factor


def _channels(header: Dataset, n_channels: int, rel: str) -> list[tuple[int, str, float, float]]:
    """(channel index, lead, mV per unit, baseline mV) of the standard-lead channels."""
    definitions = header.get("ChannelDefinitionSequence") or []
    if len(definitions) != n_channels:
        raise RecordError(rel, "ChannelDefinitionSequence does not match the channel count")
    out, seen = [], set()
    for index, channel in enumerate(definitions):
        sources = channel.get("ChannelSourceSequence")
        lead = _code_lead(sources[0]) if sources else None
        if lead is None or lead in seen:
            continue
        seen.add(lead)
        out.append((index, lead, *_channel_scale(channel, lead, rel)))
    if not out:
        raise RecordError(rel, "no standard ECG lead among the RHYTHM group's channels")
    return out


def _declared(group: _Group, rel: str, opts: ReadOptions | None) -> tuple[float, int, int, str]:
    """(rate, channels, samples, numpy sample type) of the group after checking its declared
    size against the options and the WaveformData length, before any sample is read."""
    h = group.header
    try:
        fs = float(h.get("SamplingFrequency"))
        channels = int(h.get("NumberOfWaveformChannels"))
        samples = int(h.get("NumberOfWaveformSamples"))
        bits = int(h.get("WaveformBitsAllocated"))
        interpretation = str(h.get("WaveformSampleInterpretation", "")).strip().upper()
    except (TypeError, ValueError):
        raise RecordError(rel, "missing or invalid waveform attributes") from None
    check_rate(rel, fs, opts)
    check_length(rel, fs, samples, opts)
    if not (1 <= channels <= MAX_CHANNELS) or samples < 1:
        raise RecordError(rel, f"{channels} channels x {samples} samples is not a waveform")
    kind = SAMPLE_TYPES.get((bits, interpretation))
    if kind is None:
        raise RecordError(rel, f"unsupported sample format: {bits} bits {interpretation[:2]}")
    need = channels * samples * (bits // 8)
    if group.offset is None:
        raise RecordError(rel, "the RHYTHM group has no WaveformData")
    if group.length < need:
        raise RecordError(rel, f"waveform data truncated: {group.length} of {need} bytes")
    if group.length > need + 1:  # one byte pads an odd length
        raise RecordError(rel, f"waveform data holds {group.length} bytes, {need} declared")
    return fs, channels, samples, kind


def _samples(file: Path, group: _Group, shape: tuple[int, int], kind: str, little: bool, rel: str):
    """The group's samples, (samples, channels), read from the file (exactly the declared bytes)."""
    dtype = np.dtype(("<" if little else ">") + kind)
    need = shape[0] * shape[1] * dtype.itemsize
    with open(file, "rb") as fp:
        fp.seek(int(group.offset or 0))
        buf = fp.read(need)
    if len(buf) < need:
        raise RecordError(rel, f"waveform data truncated: {len(buf)} of {need} bytes")
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


# --- the allow-listed patient fields -----------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str:
    try:
        return str(ds.get(keyword, "") or "").strip()
    except Exception:  # noqa: BLE001 - an undecodable value counts as absent
        return ""


_AGE_UNITS = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}  # DICOM AS: nnnY/M/W/D


def _age(ds: Dataset) -> float:
    text = _text(ds, "PatientAge").upper()
    if len(text) == 4 and text[:3].isdigit() and text[3] in _AGE_UNITS:
        return safe_age(int(text[:3]) / _AGE_UNITS[text[3]])
    born = compact_date(_text(ds, "PatientBirthDate"))
    dates = ("AcquisitionDateTime", "AcquisitionDate", "ContentDate", "SeriesDate", "StudyDate")
    acquired = next((d for d in (compact_date(_text(ds, k)) for k in dates) if d is not None), None)
    return age_from_dates(born, acquired)


def read_record(src: Path, rel: str, opts: ReadOptions | None = None) -> RawRecord:
    """Read one DICOM ECG file (``rel`` below ``src``): the RHYTHM group, float32 millivolts."""
    file = inside_src(source_root(src), rel, rel, opts)
    if not file.is_file():
        raise RecordError(rel, "file not found")
    ds, groups = read_header(file, rel)
    group = rhythm_group(groups, rel)
    fs, n_channels, n_samples, kind = _declared(group, rel, opts)
    try:
        channels = _channels(group.header, n_channels, rel)
    except (TypeError, ValueError, IndexError, KeyError, AttributeError):
        raise RecordError(rel, "invalid channel definitions in the RHYTHM group") from None
    raw = _samples(file, group, (n_samples, n_channels), kind, bool(ds.original_encoding[1]), rel)
    signal = np.empty((len(channels), n_samples), dtype=np.float32)
    for row, (index, _lead, gain, baseline) in enumerate(channels):
        signal[row] = raw[:, index].astype(np.float64) * gain + baseline
    return file_record(
        SOURCE,
        rel,
        signal=signal,
        fs=fs,
        lead_names=[lead for _, lead, _, _ in channels],
        patient_id=_text(ds, "PatientID") or None,
        age=_age(ds),
        sex=parse_sex(_text(ds, "PatientSex")),
    )
