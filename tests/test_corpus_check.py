"""Every reader recognises its own corpus and refuses another's bundled samples before the ingest
stores anything (``check_corpus``, ``ingestion.readers.recognise``); the generic WFDB reader takes
every WFDB folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_reader_contract import SAMPLE_FOLDERS

from ecgplat.leads import LEADS
from ingestion.pipeline import ingest
from ingestion.readers.options import ReadOptions
from ingestion.readers.protocol import check_corpus
from ingestion.readers.registry import READERS

SAMPLES = Path(__file__).parents[1] / "data" / "samples"
# folder name -> the bundled folder (numpy: arrays written by the fixture)
READER_NAMES = ("cinc2021", "ptbxl", "wfdb", "cpsc2021", "ludb", "code15", "numpy")
FOLDERS = {
    **{r: SAMPLE_FOLDERS[r] for r in READER_NAMES},
    "ptbxl_preprocessed": "ptbxl_preprocessed",
}
WFDB_FOLDERS = set(FOLDERS) - {"numpy"}
PAIRS = [(r, f) for r in READER_NAMES for f in FOLDERS]


def accepted(reader: str, folder: str) -> bool:
    return reader == folder or (reader == "wfdb" and folder in WFDB_FOLDERS)


@pytest.fixture(scope="module")
def arrays(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("arrays")
    np.save(d / "rec.npy", np.zeros((12, 5000), np.float32))
    return d


def _folder(name: str, arrays: Path) -> Path:
    return arrays if FOLDERS[name] is None else SAMPLES / FOLDERS[name]


@pytest.mark.parametrize("reader, folder", PAIRS, ids=[f"{r}-on-{f}" for r, f in PAIRS])
def test_reader_on_a_sample_folder(reader, folder, arrays, tmp_path):
    src = _folder(folder, arrays)
    if accepted(reader, folder):
        module = READERS[reader]
        listing = module.list_records(src)
        assert listing
        check_corpus(module, src, listing)  # no error
        return
    store = tmp_path / "store"
    opts = ReadOptions(fs=500.0, leads=",".join(LEADS)) if reader == "numpy" else None
    with pytest.raises(Exception, match="not a") as info:
        ingest(reader, src, store, workers=0, progress=False, opts=opts)
    assert str(src) in str(info.value) and "\n" not in str(info.value)
    assert not store.exists()  # refused before the store was created


def test_ludb_and_code15_refuse_a_cinc_folder_naming_it(tmp_path):
    """The bug: both stored the 20 challenge records, without labels (and ludb without age/sex)."""
    for reader in ("ludb", "code15"):
        with pytest.raises(ValueError, match="a CinC 2021 folder; use `ecgplat ingest cinc2021`"):
            ingest(reader, SAMPLES / "cinc2021", tmp_path / reader, workers=0, progress=False)
        assert not (tmp_path / reader).exists()


def test_unreadable_headers_are_no_evidence(tmp_path):
    """A garbled first header does not make a LUDB folder another corpus's; a folder whose only
    header is garbled is left to the reader, which rejects the record with its reason."""
    src = tmp_path / "ludb"
    shutil.copytree(SAMPLES / "ludb", src)
    (src / "data" / "1.hea").write_text("not a header\n")
    summary = ingest("ludb", src, tmp_path / "s", workers=0, progress=False)
    assert summary["records"] == 2 and sum(summary["rejected"].values()) == 1
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "x.hea").write_text("garbage\n")
    summary = ingest("code15", lone, tmp_path / "s2", workers=0, progress=False)
    assert summary["records"] == 0 and sum(summary["rejected"].values()) == 1


def test_cinc_records_with_dx_comments_stay_generic_wfdb_input(tmp_path):
    """Challenge-format records (with `#Dx` lines) are a legitimate generic WFDB folder."""
    summary = ingest("wfdb", SAMPLES / "cinc2021", tmp_path / "s", workers=0, progress=False)
    assert summary["records"] == summary["listed"] > 0
