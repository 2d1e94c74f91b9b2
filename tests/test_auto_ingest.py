"""`ingest auto`: each file's format told from its content, a mixed folder ingested in one run.

The mixed folder holds bundled WFDB and CinC 2021 records, every hospital sample (bundled, and
the licence-restricted ones of ``$ECGPLAT_HOSPITAL_DATA`` when set), a junk file named ``.xml``
and an ECG file under a misleading extension.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from hospital_samples import sample_files

from ecgplat.store import open_store
from ingestion.auto import AUTO, ingest_auto, plan_folder
from ingestion.readers.detect import UNRECOGNISED, crc_ccitt, detect, xml_reader
from ingestion.readers.registry import READERS

SAMPLES = Path(__file__).parents[1] / "data" / "samples"


@pytest.mark.parametrize(("reader", "path"), sample_files(), ids=lambda v: getattr(v, "name", v))
def test_every_hospital_sample_is_detected_as_its_format(reader, path):
    assert detect(path) == reader


def test_wfdb_headers_and_their_signal_files(tmp_path):
    assert detect(SAMPLES / "cinc2021" / "georgia" / "E07500.hea") == "cinc2021"
    assert detect(SAMPLES / "wfdb_misc" / "100.hea") == "wfdb"
    assert detect(SAMPLES / "wfdb_misc" / "100.dat") is None
    assert detect(SAMPLES / "cinc2021" / "georgia" / "E07500.mat") is None
    header = tmp_path / "x.txt"  # a header's content needs its .hea name
    header.write_bytes((SAMPLES / "wfdb_misc" / "100.hea").read_bytes())
    assert detect(header) is None


def test_content_rules_not_extensions(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((12, 10)))
    np.savez(tmp_path / "b.npz", signal=np.zeros((12, 10)))
    assert detect(tmp_path / "a.npy") == detect(tmp_path / "b.npz") == "numpy"
    (tmp_path / "c.npy").write_bytes(b"not an array at all")
    assert detect(tmp_path / "c.npy") is None
    root = '<AnnotatedECG xmlns="urn:hl7-org:v3"><id/></AnnotatedECG>'
    assert xml_reader(root.encode("utf-16")) == "hl7_aecg"  # UTF-16 with BOM
    assert xml_reader(root.encode("utf-16-le")) == "hl7_aecg"  # and without
    assert xml_reader(b"<AnnotatedECG><id/></AnnotatedECG>") is None  # not the HL7 namespace
    assert xml_reader(b'<v3:AnnotatedECG xmlns:v3="urn:hl7-org:v3"/>') == "hl7_aecg"
    prolog = b"<?xml version='1.0'?><!-- c --><!DOCTYPE RestingECG SYSTEM 'restecg.dtd'>"
    assert xml_reader(prolog + b"\n<RestingECG/>") == "muse"
    entities = b"<!DOCTYPE RestingECG [<!ENTITY a 'b'>]>" + b" " * 70000 + b"<RestingECG/>"
    assert xml_reader(entities[:4096]) == "muse"  # root past the head: the DOCTYPE's name
    assert xml_reader(b"<html><body/></html>") is None
    assert crc_ccitt(b"123456789") == 0x29B1  # the CCITT check value


def test_scp_needs_its_structure(tmp_path):
    scp = next(p for r, p in sample_files() if r == "scp")
    data = bytearray(scp.read_bytes())
    data[20] ^= 0xFF  # inside section 0: its CRC no longer checks
    (tmp_path / "bad.scp").write_bytes(bytes(data))
    assert detect(tmp_path / "bad.scp") is None
    (tmp_path / "short.scp").write_bytes(scp.read_bytes()[:-10])  # length field disagrees
    assert detect(tmp_path / "short.scp") is None


def mixed_folder(root: Path) -> tuple[Path, dict[str, str]]:
    """A mixed folder; returns it and {file: reader} of the hospital files in it."""
    src = root / "mixed"
    shutil.copytree(SAMPLES / "wfdb_misc", src / "wfdb")
    shutil.copytree(SAMPLES / "cinc2021" / "georgia", src / "cinc")
    hospital = {}
    for i, (reader, path) in enumerate(sample_files()):
        rel = f"hospital/{i:02d}_{path.name}"
        (src / "hospital").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, src / rel)
        hospital[rel] = reader
    (src / "junk.xml").write_text("this is not XML, let alone an ECG\n")
    reader, path = next((r, p) for r, p in sample_files() if r in READERS)
    shutil.copyfile(path, src / "export.dat")  # an ECG under a misleading extension
    hospital["export.dat"] = reader
    return src, hospital


def test_mixed_folder_in_one_run(tmp_path):
    src, hospital = mixed_folder(tmp_path)
    plan = plan_folder(src)
    assert plan.rejects == [("junk.xml", UNRECOGNISED)]
    assert plan.groups["wfdb"] == ["wfdb/100.hea", "wfdb/a103l.hea", "wfdb/s0010_re.hea"]
    assert plan.groups["cinc2021"] == ["cinc/E07500.hea", "cinc/E07509.hea"]
    summary = ingest_auto(src, tmp_path / "store", workers=0, progress=False)
    s = open_store(tmp_path / "store")
    records, rejects = s.records, s.rejects
    assert records["record_key"].is_unique
    assert set(records["source"]) >= {"wfdb", "cinc2021"}
    assert (records["source"] == "cinc2021").sum() == 2
    stored = set(zip(records["source"], records["path"], strict=True))
    refused = set(zip(rejects["source"], rejects["path"], strict=True))
    assert (AUTO, "junk.xml", UNRECOGNISED) in set(
        zip(rejects["source"], rejects["path"], rejects["reason"], strict=True)
    )
    for rel, reader in hospital.items():  # each went to the reader its content needs
        if reader not in READERS:
            continue
        bare = rel.rpartition(".")[0]
        assert {(reader, rel), (reader, bare)} & (stored | refused), rel
    assert any(source == hospital["export.dat"] for source, _ in stored if _ == "export.dat")
    assert summary["rejected"].get(UNRECOGNISED) == 1
    assert summary["store_records"] == s.n_records
    again = ingest_auto(src, tmp_path / "store", workers=0, progress=False)
    assert again["records"] == 0 and sum(again["rejected"].values()) == 0
    assert open_store(tmp_path / "store").n_records == s.n_records


def test_nothing_known_is_refused_before_the_store(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.xml").write_text("<html/>")
    (tmp_path / "junk" / "b.dat").write_bytes(b"\0" * 100)
    for folder in ("empty", "junk"):
        with pytest.raises(ValueError, match="no file of a known ECG format"):
            ingest_auto(tmp_path / folder, tmp_path / "store", workers=0, progress=False)
    assert not (tmp_path / "store").exists()


def hostile_folder(root: Path) -> dict[str, str]:
    """The hostile vendor files in ``root``; {file: the reader its content claims}."""
    import hostile_files as H

    dicom = next(p for r, p in sample_files(restricted=False) if r == "dicom")
    scp = next(p for r, p in sample_files(restricted=False) if r == "scp")
    root.mkdir(parents=True, exist_ok=True)
    H.write_billion_laughs(root / "laughs.xml")
    H.write_xxe(root / "xxe.xml")
    H.write_oversized_base64(root / "big.xml")
    H.write_dicom_huge_waveform(root / "huge.dcm", dicom)
    H.write_scp_section_past_eof(root / "past_eof.scp", scp)
    H.write_edf_wrong_record_count(root / "count.edf")
    return {
        "laughs.xml": "muse",
        "xxe.xml": "philips",
        "big.xml": "muse",
        "huge.dcm": "dicom",
        "past_eof.scp": "scp",
        "count.edf": "edf",
    }


def test_hostile_vendor_files_are_rejected_by_their_readers(tmp_path):
    files = hostile_folder(tmp_path / "src")
    for name, reader in files.items():
        assert detect(tmp_path / "src" / name) == reader, name
    ingest_auto(tmp_path / "src", tmp_path / "store", workers=0, progress=False)
    s = open_store(tmp_path / "store")
    assert s.n_records == 0
    rejected = dict(zip(s.rejects["path"], s.rejects["source"], strict=True))
    for name, reader in files.items():
        assert rejected.get(name) == (reader if reader in READERS else AUTO), name
    reasons = " ".join(s.rejects["reason"])
    assert "HOSTILE" not in reasons and "root:" not in reasons  # no value, no /etc/passwd line


def test_derived_leads_are_marked_per_record(tmp_path):
    from ecgplat.leads import LEADS
    from ecgplat.store.writer import derived_mask

    present = np.ones(12, dtype=bool)
    present[LEADS.index("aVF")] = False
    marked = derived_mask({"derived_leads": ["III", "avr", "aVL", "aVF"]}, present)
    assert [LEADS[i] for i in np.flatnonzero(marked)] == ["III", "aVR", "aVL"]
    assert not derived_mask({}, present).any()
    muse = [p for r, p in sample_files() if r == "muse"]
    if not muse:
        pytest.skip("no GE MUSE sample: set ECGPLAT_HOSPITAL_DATA (GPL/unlicensed samples)")
    (tmp_path / "src").mkdir()
    for p in muse:
        shutil.copyfile(p, tmp_path / "src" / p.name)
    ingest_auto(tmp_path / "src", tmp_path / "store", workers=0, progress=False)
    s = open_store(tmp_path / "store")
    assert s.n_records == len(muse)
    derived = [LEADS.index(lead) for lead in ("III", "aVR", "aVL", "aVF")]
    assert s.derived_masks[:, derived].all() and s.derived_masks.sum() == 4 * len(muse)
