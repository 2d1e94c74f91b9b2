"""The registry of corpus readers: source name -> reader module (``READERS``, ``get_reader``), and
the reader a lone WFDB header needs (``reader_for_header``)."""

from __future__ import annotations

from ingestion.readers import (
    cinc2021,
    code15,
    cpsc2021,
    dicom_ecg,
    edf,
    hl7_aecg,
    ludb,
    muse,
    numpy_arrays,
    philips,
    ptbxl,
    scp_ecg,
    wfdb_dir,
)
from ingestion.readers.protocol import Reader

READERS: dict[str, Reader] = {
    "cinc2021": cinc2021,
    "ptbxl": ptbxl,
    "wfdb": wfdb_dir,
    "cpsc2021": cpsc2021,
    "ludb": ludb,
    "code15": code15,
    "scp": scp_ecg,
    "edf": edf,
    "hl7_aecg": hl7_aecg,
    "dicom": dicom_ecg,
    "numpy": numpy_arrays,
    "muse": muse,
    "philips": philips,
}


def get_reader(name: str) -> Reader:
    """The reader module of corpus ``name``; ValueError listing the known corpora otherwise."""
    try:
        return READERS[name]
    except KeyError:
        raise ValueError(f"unknown corpus {name!r} (known: {', '.join(READERS)})") from None


def reader_for_header(text: str) -> Reader:
    """The reader of the record whose ``.hea`` header is ``text``: cinc2021 for the challenge's
    format (every signal line names a .mat file and a `Dx:` comment holds the labels), else the
    generic WFDB reader (which reads other .mat records, e.g. with non-ECG channels, through
    wfdb)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    body = [ln.split() for ln in lines if not ln.startswith("#")]
    files = [tok[0] for tok in body[1:]]
    has_dx = any(ln.lstrip("# ").lower().startswith("dx:") for ln in lines if ln.startswith("#"))
    if files and has_dx and all(f.lower().endswith(".mat") for f in files):
        return cinc2021
    return wfdb_dir
