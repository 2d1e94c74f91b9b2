"""The reader contract, checked for every reader of the registry on its bundled samples (the numpy
reader on arrays written here): float32 samples in millivolts, lead names mapped to the canonical
leads with the right conditioned mask, a truncated data file rejected with a one-line
``RecordError`` naming the record, the path policy on a symbolic link leading outside SRC,
unicode file names read like ASCII ones, and patients pseudonymised in the store an in-process
ingest of the samples writes."""

import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from edf_files import Channel, write_edf
from hostile_files import ecg
from muse_xml import muse_samples, write_muse

from ecgplat.leads import LEADS, canonical_lead
from ecgplat.store import SEGMENT_SECONDS, open_store
from ingestion.conditioning import condition, to_int16_microvolts
from ingestion.pipeline import ingest
from ingestion.readers.options import READER_FIELDS, ReadOptions
from ingestion.readers.protocol import patient_hint, reader_options
from ingestion.readers.record import RecordError
from ingestion.readers.registry import READERS

SAMPLES = Path(__file__).parents[1] / "data" / "samples"
# reader -> its bundled sample folder (None: files written by its `WRITTEN` function)
SAMPLE_FOLDERS = {
    "cinc2021": "cinc2021",
    "ptbxl": "ptbxl",
    "wfdb": "wfdb_misc",
    "cpsc2021": "cpsc2021",
    "ludb": "ludb",
    "code15": "code15",
    "numpy": None,
    "hl7_aecg": "hospital/hl7_aecg",
    "dicom": "hospital/dicom_ecg",
    "philips": "hospital/philips_xml",
    "muse": None,  # GPL/unlicensed samples: synthetic files (tests/muse_xml.py)
    "scp": "hospital/scp_ecg",
    "edf": None,  # GPL samples: EDF+ files written by `edf_corpus` (tests/edf_files.py)
}
# readers whose record is one file, named with its extension (rel = the file's path)
ONE_FILE = {"numpy", "hl7_aecg", "dicom", "philips", "muse", "scp", "edf"}
NAMES = sorted(READERS)
NPY_LEADS = ("V6", "V5", "V4", "V3", "V2", "V1", "II", "I")  # 8 of 12, reversed: mapping shows
NPY_PATIENTS = {"rec_a": "NPY-PATIENT-0417", "sub/rec_b": "NPY-PATIENT-0923"}
# the canonical leads of each reader's first readable sample record
FIRST_LEADS = {
    "cinc2021": LEADS,
    "ptbxl": LEADS,
    "ludb": LEADS,
    "code15": LEADS,
    "cpsc2021": ("I", "II"),
    "wfdb": ("II", "V5"),  # MIT-BIH 100: MLII and V5
    "numpy": tuple(reversed(NPY_LEADS)),
    "hl7_aecg": LEADS,
    "dicom": LEADS,
    "philips": LEADS,
    "muse": LEADS,  # I, II, V1-V6 stored, III, aVR, aVL, aVF derived
    "scp": LEADS,
    "edf": ("I", "II", "V2"),
}
NO_PATIENT_IDS = ("wfdb", "ludb")  # formats without patient ids: every record is its own patient
UNICODE_DIR = "ünïcødé ✓ 心电"
UNICODE_NAME = "ÉCG_心电_ñ"  # WFDB headers split on whitespace: no space in a record name
# what the reason says of a data file cut in half, where not "truncated" (the .npy loader
# cannot tell why it fails)
TRUNCATED = {"hl7_aecg": "not well-formed XML"}  # numpy: "... header implies ...: truncated"
TRUNCATED |= {"philips": "not well-formed XML", "muse": "not well-formed XML"}
PSEUDONYM = re.compile(r"p-[0-9a-f]{16}")


def numpy_corpus(root: Path) -> tuple[Path, ReadOptions]:
    """Two .npy records (8 leads in ``NPY_LEADS`` order, 12 s at 500 Hz, in µV) under
    ``root/arrays`` and a patients CSV beside it; the options that read them."""
    src = root / "arrays"
    for i, rec in enumerate(NPY_PATIENTS):
        path = src / f"{rec}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, ecg(len(NPY_LEADS), 6000, seed=i).T * 1000.0)  # float64 µV
    csv = root / "patients.csv"
    rows = [f"{rec},{pid}" for rec, pid in NPY_PATIENTS.items()]
    csv.write_text("\n".join(["record_id,patient_id", *rows]) + "\n", encoding="utf-8")
    return src, ReadOptions(fs=500, leads=",".join(NPY_LEADS), units="uV", patients=str(csv))


def muse_corpus(root: Path) -> tuple[Path, ReadOptions]:
    """Three synthetic MUSE files under ``root/muse``: two with made-up patients, one without
    demographics."""
    src = root / "muse"
    write_muse(src / "a.xml", patient="MUSE-PATIENT-0417")
    write_muse(src / "sub" / "b.xml", leads=muse_samples(seed=1), patient="MUSE-PATIENT-0923")
    write_muse(src / "c.xml", leads=muse_samples(seed=2))
    return src, ReadOptions()


def edf_corpus(root: Path) -> tuple[Path, ReadOptions]:
    """Two EDF+ records under ``root/edf`` (ECG I, II, V2 in µV and a respiration channel, 12 s
    at 500 Hz), their patient codes in the EDF+ patient identification."""
    src = root / "edf"
    for i, (rec, pid) in enumerate(NPY_PATIENTS.items()):
        x = np.round(ecg(3, 6000, seed=i).T * 1000.0).astype(np.int16)  # µV at unit gain
        labels = ("ECG I", "ECG II", "ECG V2")
        channels = [Channel(label, row, 500) for label, row in zip(labels, x, strict=True)]
        channels.append(Channel("Resp", x[0], 500, "mV", (-10, 10)))
        path = src / f"{rec}.edf"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_edf(path, channels, patient=f"{pid.replace('NPY', 'EDF')} F X X")
    return src, ReadOptions()


WRITTEN = {"numpy": numpy_corpus, "muse": muse_corpus, "edf": edf_corpus}  # samples written here


def corpus(name: str, tmp_path: Path) -> tuple[Path, ReadOptions]:
    """A private copy of reader ``name``'s samples under ``tmp_path`` and its read options."""
    if SAMPLE_FOLDERS[name] is None:
        return WRITTEN[name](tmp_path)
    src = tmp_path / "src"
    shutil.copytree(SAMPLES / SAMPLE_FOLDERS[name], src)
    return src, ReadOptions()


def sample_source(name: str, tmp_path: Path) -> tuple[Path, ReadOptions]:
    """Reader ``name``'s bundled samples, read in place (numpy: arrays written to ``tmp_path``)."""
    if SAMPLE_FOLDERS[name] is None:
        return WRITTEN[name](tmp_path)
    return SAMPLES / SAMPLE_FOLDERS[name], ReadOptions()


def readable(name: str, src: Path, opts: ReadOptions) -> dict:
    """rel -> RawRecord of every listed record the reader reads (at least one), but for those too
    short for conditioning to keep (the minimal aECG of 13 samples)."""
    reader, out = READERS[name], {}
    for rel in reader.list_records(src):
        try:
            rec = reader.read_record(src, rel, opts)
        except RecordError:
            continue
        if rec.n_samples >= rec.fs * SEGMENT_SECONDS:
            out[rel] = rec
    assert out, f"no readable {name} sample"
    return out


def data_file(name: str, src: Path, rel: str) -> Path:
    """The signal file of record ``rel``."""
    if name in ONE_FILE:
        return src / rel
    return next(src / f"{rel}{s}" for s in (".dat", ".mat") if (src / f"{rel}{s}").is_file())


def move_record(name: str, src: Path, rel: str, new_rel: str, opts: ReadOptions) -> None:
    """Move record ``rel`` to ``new_rel``, renaming it in its header (WFDB), in
    ``ptbxl_database.csv`` (PTB-XL) or in the patients CSV (numpy)."""
    if name in ONE_FILE:
        (src / new_rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).rename(src / new_rel)
        if name != "numpy":
            return
        csv = Path(str(opts.patients))
        old_id, new_id = rel.removesuffix(".npy"), new_rel.removesuffix(".npy")
        csv.write_text(csv.read_text(encoding="utf-8").replace(old_id, new_id), encoding="utf-8")
        return
    old, new = Path(rel).name, Path(new_rel).name
    folder = (src / new_rel).parent
    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted((src / rel).parent.glob(f"{old}.*")):
        target = folder / f"{new}{f.name[len(old) :]}"
        if f.suffix != ".hea":
            f.rename(target)
            continue
        lines, seen_record_line = [], False
        for line in f.read_text(encoding="utf-8").splitlines():
            tok = line.split()
            if tok and not line.startswith("#"):
                if not seen_record_line or tok[0].startswith(f"{old}."):
                    tok[0] = new + tok[0][len(old) :]
                    line = " ".join(tok)
                seen_record_line = True
            lines.append(line)
        target.write_text("\n".join(lines) + "\n", encoding="utf-8")
        f.unlink()
    if name == "ptbxl":
        csv = src / "ptbxl_database.csv"
        csv.write_text(csv.read_text(encoding="utf-8").replace(rel, new_rel), encoding="utf-8")


def test_every_reader_has_samples_and_meets_the_protocol():
    assert set(SAMPLE_FOLDERS) == set(READERS) == set(FIRST_LEADS)
    for name, reader in READERS.items():
        assert name == reader.SOURCE
        assert callable(reader.list_records) and callable(reader.read_record)
        assert set(reader_options(reader)) <= set(READER_FIELDS)
        for optional in ("check_options", "patient_hint"):
            assert callable(getattr(reader, optional, len)), f"{name}.{optional}"


@pytest.mark.parametrize("name", NAMES)
def test_samples_read_as_float32_millivolts(name, tmp_path):
    src, opts = sample_source(name, tmp_path)
    for rel, rec in readable(name, src, opts).items():
        assert rec.source == name and rec.path == rel
        assert rec.signal.dtype == np.float32 and rec.signal.ndim == 2
        assert rec.signal.shape[0] == len(rec.lead_names) and rec.signal.shape[1] > 0
        assert rec.units == "mV" and rec.fs > 0
        ecg_rows = [i for i, n in enumerate(rec.lead_names) if canonical_lead(n) is not None]
        peak = float(np.abs(rec.signal[ecg_rows]).max())
        assert 0.1 < peak < 50, f"{rel}: peak {peak} mV is not an ECG in millivolts"
        assert rec.labels.dtype == bool and rec.labels.shape == (26,)


@pytest.mark.parametrize("name", NAMES)
def test_leads_map_to_canonical_and_the_mask_is_right(name, tmp_path):
    src, opts = sample_source(name, tmp_path)
    records = readable(name, src, opts)
    first = next(iter(records.values()))
    assert {canonical_lead(n) for n in first.lead_names} - {None} == set(FIRST_LEADS[name])
    for rel, rec in records.items():
        c = condition(rec, opts)
        leads = [canonical_lead(n) for n in rec.lead_names]
        assert c.lead_mask.tolist() == [lead in leads for lead in LEADS], rel
        assert c.segments.dtype == np.int16 and c.segments.shape[1:] == (12, 2500)
        assert not c.segments[:, ~c.lead_mask].any(), f"{rel}: an absent lead holds samples"
        if rec.fs != 500:
            continue
        for row, lead in enumerate(leads):  # at 500 Hz: each lead's samples in its own row
            if lead is not None and leads.index(lead) == row:
                want = to_int16_microvolts(rec.signal[row, :2500])
                assert np.array_equal(c.segments[0, LEADS.index(lead)], want), (rel, lead)


@pytest.mark.parametrize("name", NAMES)
def test_truncated_data_file_is_one_line_error_naming_the_record(name, tmp_path):
    src, opts = corpus(name, tmp_path)
    rel = next(iter(readable(name, src, opts)))
    path = data_file(name, src, rel)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(RecordError) as info:
        READERS[name].read_record(src, rel, opts)
    err = info.value
    assert err.path == rel and str(err) == f"{rel}: {err.reason}"
    assert "\n" not in str(err) and TRUNCATED.get(name, "truncated") in err.reason, str(err)


@pytest.mark.parametrize("name", NAMES)
def test_symlink_leading_outside_src_is_refused_unless_allowed(name, tmp_path):
    src, opts = corpus(name, tmp_path)
    rel, want = next(iter(readable(name, src, opts).items()))
    path = data_file(name, src, rel)
    outside = tmp_path / "outside" / path.name
    outside.parent.mkdir()
    path.rename(outside)
    path.symlink_to(outside)
    reader = READERS[name]
    with pytest.raises(RecordError, match=r"refused: symbolic link \(allow with --follow"):
        reader.read_record(src, rel, opts)
    follow = replace(opts, follow_symlinks=True)
    with pytest.raises(RecordError, match="refused: symbolic link resolves outside SRC"):
        reader.read_record(src, rel, follow)
    got = reader.read_record(src, rel, replace(follow, allow_outside=True))
    assert np.array_equal(got.signal, want.signal)


@pytest.mark.parametrize("name", NAMES)
def test_unicode_file_names_read_like_ascii_ones(name, tmp_path):
    src, opts = corpus(name, tmp_path)
    records = readable(name, src, opts)
    rel = next(iter(records))
    if name == "cpsc2021":  # the name holds the patient: only the folder can change
        new_rel = f"{UNICODE_DIR}/{Path(rel).name}"
    elif name in ONE_FILE:
        new_rel = f"{UNICODE_DIR}/{UNICODE_NAME}{Path(rel).suffix}"
    else:
        new_rel = (Path(rel).parent / UNICODE_DIR / UNICODE_NAME).as_posix()
    move_record(name, src, rel, new_rel, opts)
    want, got = records[rel], READERS[name].read_record(src, new_rel, opts)
    assert got.path == new_rel
    assert np.array_equal(got.signal, want.signal) and got.signal.dtype == want.signal.dtype
    assert (got.fs, got.lead_names, got.units) == (want.fs, want.lead_names, want.units)
    assert (got.codes, got.sex, got.patient_id) == (want.codes, want.sex, want.patient_id)
    assert np.array_equal(got.labels, want.labels)
    assert np.array_equal(got.age, want.age, equal_nan=True)


def _add_cinc_patients(src: Path) -> None:
    """The CinC 2021 samples carry no patient ids: give each pair of records one (the
    ``#Patient:`` comment of synthetic cohorts) so the pseudonym check has something to find."""
    for i, hea in enumerate(sorted(src.rglob("*.hea"))):
        with open(hea, "a", encoding="utf-8") as f:
            f.write(f"#Patient: CINC-PATIENT-{i // 2:03d}\n")


@pytest.mark.parametrize("name", NAMES)
def test_patients_are_pseudonymised_in_the_store(name, tmp_path):
    src, opts = corpus(name, tmp_path)
    if name == "cinc2021":
        _add_cinc_patients(src)
    reader = READERS[name]
    records = readable(name, src, opts)
    raw = {rec.patient_id for rec in records.values()} | {
        patient_hint(reader, src, rel, opts) for rel in reader.list_records(src)
    }
    raw.discard(None)
    if name in NO_PATIENT_IDS:
        assert not raw
    else:
        assert raw, f"{name}: no raw patient id to look for"
    store = tmp_path / "store"
    ingest(name, src, store, workers=0, progress=False, opts=opts)
    table = open_store(store).records
    assert len(table) == len(records)
    keys = table["patient_key"].astype(str)
    assert all(PSEUDONYM.fullmatch(k) for k in keys), keys.tolist()
    n_own = sum(rec.patient_id is None for rec in records.values())
    assert keys.nunique() == len({r.patient_id for r in records.values()} - {None}) + n_own
    rejects = open_store(store).rejects
    cells = [
        str(v)
        for frame in (table, rejects)
        for col in frame.columns
        if frame[col].dtype == object
        for v in frame[col]
    ]
    for pid in raw:
        token = re.compile(rf"(?<![0-9A-Za-z]){re.escape(pid)}(?![0-9A-Za-z])")
        leaks = [c for c in cells if token.search(c)]
        assert not leaks, f"raw patient id {pid!r} in the store's tables: {leaks[:3]}"
    # in the files: the ids of 4 characters or more (shorter ones match binary data by chance)
    for file in (f for f in store.rglob("*") if f.is_file()):
        data = file.read_bytes()
        leaked = [pid for pid in raw if len(pid) >= 4 and pid.encode() in data]
        assert not leaked, f"raw patient ids {leaked} in {file.relative_to(store)}"
