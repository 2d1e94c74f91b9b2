"""The hospital-format sample files of the tests, and the identifying values they hold.

``sample_files()`` lists the bundled permissive samples (``data/samples/hospital/<format>/``)
and, when ``$ECGPLAT_HOSPITAL_DATA`` names a folder, the GPL/unlicensed ones kept there (same
layout). ``identifying_values(path)`` extracts, with plain parsers independent of the readers
(xml.etree, pydicom, struct), the values of the fields that identify a patient, a clinician, a
site or an encounter (the field names of ``$ECGPLAT_HOSPITAL_DATA/README.md``). No value is
written in this file or anywhere in the repository: they are read from the samples each run.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

BUNDLED = Path(__file__).parents[1] / "data" / "samples" / "hospital"
# sample folder -> the reader that must read its files
FOLDER_READERS = {
    "ge_muse": "muse",
    "philips_xml": "philips",
    "hl7_aecg": "hl7_aecg",
    "dicom_ecg": "dicom",
    "scp_ecg": "scp",
    "edf": "edf",
}
NOT_SAMPLES = (".md", ".txt", ".csv")  # SOURCE.md, licence texts, source tables


def restricted_root() -> Path | None:
    """The folder of the GPL/unlicensed samples (``$ECGPLAT_HOSPITAL_DATA``), if set and there."""
    root = os.environ.get("ECGPLAT_HOSPITAL_DATA")
    return Path(root) if root and Path(root).is_dir() else None


def sample_files(restricted: bool = True) -> list[tuple[str, Path]]:
    """(expected reader, path) of every sample file, bundled first; a file present in both
    places (same folder and name) is listed once."""
    roots = [BUNDLED] + ([r] if restricted and (r := restricted_root()) else [])
    seen, out = set(), []
    for root in roots:
        for folder, reader in FOLDER_READERS.items():
            for f in sorted((root / folder).glob("*")) if (root / folder).is_dir() else ():
                if (
                    f.is_file()
                    and not f.name.endswith(NOT_SAMPLES)
                    and (folder, f.name) not in seen
                ):
                    seen.add((folder, f.name))
                    out.append((reader, f))
    return out


# ---- identifying values ------------------------------------------------------------------------

# Values not searched for: shorter than 4 characters ("M", "F", "0", ages such as "52" match
# by chance in any binary file); masks and placeholders ("XXXX", "Anonymous"), sexes and other
# generic words; numbers of fewer than 7 digits (times such as 091000, short ids: such digit
# runs occur by chance in the floats of every metric log).
GENERIC = {"unknown", "none", "male", "female", "null", "n/a", "test", "other", "startdate"}
GENERIC |= {"anonymous", "adult", "muse"}  # placeholders; the vendor system's name
MIN_LENGTH = 4
MIN_DIGITS = 7


def keep(value: str) -> bool:
    v = value.strip()
    if len(v) < MIN_LENGTH or v.lower() in GENERIC:
        return False
    if v.isdigit() and len(v) < MIN_DIGITS:
        return False
    return not re.fullmatch(r"[Xx0\W_]*", v)  # masks (XXXX), zero dates/times, punctuation


def _with_dates(values: set[str]) -> set[str]:
    """``values`` plus the ISO and compact forms of those that read as dates."""
    out = set(values)
    for v in values:
        for fmt in ("%m-%d-%Y", "%Y-%m-%d", "%Y%m%d", "%d.%m.%y", "%d-%b-%Y", "%d/%m/%Y"):
            try:
                d = _dt.datetime.strptime(v.strip(), fmt).date()
            except ValueError:
                continue
            out |= {d.isoformat(), d.strftime("%Y%m%d")}
    return out


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _texts(elem: ET.Element, attrs: tuple[str, ...] = ()) -> set[str]:
    """The text of ``elem`` and of its descendants, and their attributes ``attrs``."""
    out = set()
    for e in elem.iter():
        if e.text and e.text.strip():
            out.add(e.text.strip())
        out |= {e.get(a, "").strip() for a in attrs}
    return out


MUSE_BLOCKS = {  # block -> identifying children (README); age and sex are kept by design
    "PatientDemographics": {
        "PatientID", "DateofBirth", "Race", "HeightCM", "WeightKG", "PatientLastName",
        "PatientFirstName",
    },
    "TestDemographics": {
        "SiteName", "LocationName", "AcquisitionDate", "AcquisitionTime", "EditDate", "EditTime",
        "CartNumber", "OverreaderID", "EditorID", "TestReason", "OrderingMDLastName",
        "OrderingMDFirstName", "ReferringMDLastName", "ReferringMDFirstName",
        "OverreaderLastName", "OverreaderFirstName", "AcquisitionTechLastName",
        "EditorLastName", "EditorFirstName",
    },
    "Order": None,  # every child
    "PharmaData": {"PharmaUniqueECGID", "PharmaCartID"},
}  # fmt: skip


def _muse(root: ET.Element) -> set[str]:
    out = set()
    for block, names in MUSE_BLOCKS.items():
        for b in root.iter(block):
            for child in b:
                if names is None or child.tag in names:
                    out |= _texts(child)
    for stmt in root.iter("StmtText"):  # "Confirmed by <physician> M.D."
        m = re.search(r"Confirmed by (.+?)(?: M\.?D\.?)?\s*(?:\(|$)", stmt.text or "")
        if m:
            out |= {m.group(1).strip(), *m.group(1).replace(",", " ").split()}
    return out


PHILIPS_ELEMENTS = {
    "patientid", "lastname", "firstname", "dateofbirth", "reasonfororder", "orderremarks",
    "departmentname", "institutionname", "facilityname", "departmentid",
    "institutionlocationid", "documentname", "filename",
}  # fmt: skip
PHILIPS_ATTRS = {
    "dataacquisition": ("date", "time"),
    "machine": ("machineid",),
    "operator": ("id",),
}


def _philips(root: ET.Element) -> set[str]:
    out = set()
    for e in root.iter():
        name = _local(e.tag)
        if name in PHILIPS_ELEMENTS:
            out |= _texts(e)
        out |= {e.get(a, "") for a in PHILIPS_ATTRS.get(name, ())}
        if name == "userdefine":  # 'Incident Id', 'FIN#', 'Ordering MD', 'PROVIDER' values
            out |= {_texts(c).pop() for c in e if _local(c.tag) == "value" and _texts(c)}
    return out


HL7_ELEMENTS = {
    "trialSubject", "subjectDemographicPerson", "investigatorPerson", "trialInvestigator",
    "trialSite", "studyEventPerformer", "assignedPerson", "clinicalTrial", "testingSite",
}  # fmt: skip


def _hl7(root: ET.Element) -> set[str]:
    out = set()
    for e in root.iter():
        name = _local(e.tag)
        if name in HL7_ELEMENTS:
            out |= _texts(e, ("extension", "value"))
        elif name == "effectiveTime":
            out |= _texts(e, ("value",))
        elif name == "birthTime":
            out.add(e.get("value", ""))
    return out


def _xml(path: Path) -> set[str]:
    root = ET.parse(path).getroot()  # samples only: trusted files, no entities
    name = _local(root.tag)
    if name == "RestingECG":
        return _muse(root)
    if name == "AnnotatedECG":
        return _hl7(root)
    return _philips(root)


DICOM_TAGS = [
    (0x0010, 0x0010), (0x0010, 0x0020), (0x0010, 0x0030), (0x0010, 0x1000), (0x0010, 0x2160),
    (0x0008, 0x0050), (0x0038, 0x0010), (0x0008, 0x0080), (0x0008, 0x0081), (0x0008, 0x0090),
    (0x0032, 0x1032), (0x0008, 0x1048), (0x0008, 0x1050), (0x0008, 0x0020), (0x0008, 0x0030),
    (0x0008, 0x002A), (0x0008, 0x0023), (0x0008, 0x0033), (0x0008, 0x0012), (0x0008, 0x0013),
    (0x0020, 0x000D), (0x0020, 0x000E), (0x0008, 0x0018), (0x0008, 0x1010), (0x0020, 0x0010),
]  # fmt: skip


def _dicom(path: Path) -> set[str]:
    import pydicom

    out = set()
    with warnings.catch_warnings():  # the samples' UIDs are not all valid UIs
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True)
        for tag in DICOM_TAGS:
            if tag in ds and ds[tag].value not in (None, ""):
                value = str(ds[tag].value)
                out |= {value, *re.split(r"[\^ ]+", value)}  # a person name's components too
    return out


def _edf(path: Path) -> set[str]:
    head = path.read_bytes()[:256].decode("ascii", errors="replace")
    fields = [head[8:88], head[88:168], head[168:176], head[176:184]]
    out = set()
    for field in fields:
        out |= {field.strip(), *field.split()}
    return out


SCP_TEXT_TAGS = {0, 1, 2, 3, 13, 16, 17, 18, 19, 20, 21, 22, 23, 30, 31, 35}


def _scp(path: Path) -> set[str]:
    data = path.read_bytes()
    length = int.from_bytes(data[10:14], "little")
    section1 = None
    for at in range(6 + 16, 6 + length, 10):  # section 0's pointers: id, length, index
        sid = int.from_bytes(data[at : at + 2], "little")
        size = int.from_bytes(data[at + 2 : at + 6], "little")
        index = int.from_bytes(data[at + 6 : at + 10], "little")
        if sid == 1 and size:
            section1 = data[index - 1 + 16 : index - 1 + size]
    out: set[str] = set()
    pos = 0
    while section1 is not None and pos + 3 <= len(section1):
        tag, n = section1[pos], int.from_bytes(section1[pos + 1 : pos + 3], "little")
        value = section1[pos + 3 : pos + 3 + n]
        pos += 3 + n
        if tag == 255:
            break
        if tag in SCP_TEXT_TAGS:
            out.add(value.split(b"\0")[0].decode("latin-1"))
        elif tag in (5, 25) and n >= 4:  # dates: year (2 bytes), month, day
            y, m, d = int.from_bytes(value[:2], "little"), value[2], value[3]
            if y and m and d:
                out |= {f"{y:04d}-{m:02d}-{d:02d}", f"{y:04d}{m:02d}{d:02d}"}
        elif tag == 26 and n >= 3:
            out.add("{:02d}:{:02d}:{:02d}".format(*value[:3]))
        elif tag == 14:  # acquiring device: its text parts
            out |= {s.decode("latin-1") for s in re.findall(rb"[\x20-\x7e]{4,}", value)}
    return out


def identifying_values(path: Path) -> set[str]:
    """The identifying values of one sample file (see the module docstring), each at least
    ``MIN_LENGTH`` characters and not generic (``keep``), with ISO/compact forms of dates."""
    head = path.read_bytes()[:132]
    if head[128:132] == b"DICM":
        raw = _dicom(path)
    elif head.startswith(b"0       "):
        raw = _edf(path)
    elif path.suffix.lower() == ".scp":
        raw = _scp(path)
    else:
        raw = _xml(path)
    return {v.strip() for v in _with_dates({v for v in raw if v}) if keep(v)}
