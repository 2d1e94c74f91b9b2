"""The feature store: schema, read API against the source files, privacy, appends of a second corpus."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from ecgplat.labels import codes_to_multihot
from ecgplat.privacy import pseudonymise
from ecgplat.store import open_store


def test_fixture_store_matches_source_files(synth_cohort, synth_store):
    store = open_store(synth_store)
    manifest = json.loads((synth_cohort / "synth_manifest.json").read_text())
    assert store.n_records == 72 and store.n_segments == 144
    frame = store.records
    assert list(frame["path"]) == [r["path"] for r in manifest["records"]]
    # every record: segments == the .mat values (gain 1000/mV -> µV ints) cut into 5 s windows
    for i in (0, 37, 71):
        val = scipy.io.loadmat(synth_cohort / (frame["path"][i] + ".mat"))["val"]
        expected = val[:, :5000].reshape(12, 2, 2500).transpose(1, 0, 2) / 1000.0
        np.testing.assert_allclose(store.record_segments(i), expected, atol=1e-6)
        assert store.labels[i].tolist() == codes_to_multihot(manifest["records"][i]["codes"]).tolist()
    assert store.segment_record_index.tolist() == np.repeat(np.arange(72), 2).tolist()
    assert store.segment_number.tolist() == [0, 1] * 72
    assert store.lead_masks.all()
    secret = (synth_store / "secret.key").read_bytes()
    assert len(secret) == 32
    assert stat.S_IMODE(os.stat(synth_store / "secret.key").st_mode) == 0o600
    want = [pseudonymise(r["patient"], secret) for r in manifest["records"]]
    assert list(frame["patient_key"]) == want


def test_read_segments_any_order(synth_store):
    store = open_store(synth_store)
    idx = [143, 5, 5, 0, 77]
    got = store.read_segments(idx)
    for row, j in zip(got, idx):
        rec = store.segment_record_index[j]
        np.testing.assert_array_equal(row, store.record_segments(rec)[store.segment_number[j]])
    assert got.dtype == np.float32
    with pytest.raises(IndexError):
        store.read_segments([144])


def test_select_filters(synth_store):
    store = open_store(synth_store)
    frame = store.records
    for split in ("train", "valid", "test"):
        assert store.select(split=split).tolist() == np.flatnonzero(frame["split"] == split).tolist()
    pk = frame["patient_key"][4]
    assert store.select(patient_key=pk).tolist() == [3, 4, 5]
    both = store.select(split=["valid", "test"], ident_split="gallery")
    assert set(both) == set(np.flatnonzero(frame["split"].isin(["valid", "test"])
                                           & (frame["ident_split"] == "gallery")))


def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        open_store(tmp_path)
    (tmp_path / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                    "attributes": {}}))
    with pytest.raises(ValueError, match="schema version"):
        open_store(tmp_path)


def test_no_raw_patient_ids_in_store_bytes(synth_store):
    for dirpath, _, files in os.walk(synth_store):
        for name in files:
            data = Path(dirpath, name).read_bytes()
            assert b"SYN0" not in data, name
            assert b"SYN0" not in name.encode()


def test_file_names_with_patient_ids_are_redacted(samples_dir, tmp_path):
    """CPSC 2021 names files data_<patient>_<record>: the raw id must not survive anywhere."""
    from ingestion.pipeline import ingest
    from ingestion.shards import write_shards
    from ingestion.splits import split_store

    store = tmp_path / "store"
    first = ingest("cpsc2021", samples_dir / "cpsc2021", store, workers=0, progress=False)
    assert first["records"] == 3 and first["patients"] == 1
    again = ingest("cpsc2021", samples_dir / "cpsc2021", store, workers=0, progress=False)
    assert again["records"] == 0 and again["skipped"] == 3  # idempotent despite redaction
    frame = open_store(store).records
    key = frame["patient_key"][0]
    assert sorted(frame["record_id"]) == sorted(f"data_{key}_{k}" for k in (10, 4, 6))
    assert all(p.startswith(f"data_{key}_") for p in frame["path"])
    split_store(store, valid=0.0, test=0.0)
    write_shards(store, "train", tmp_path / "shards")
    for root in (store, tmp_path / "shards"):
        for dirpath, _, files in os.walk(root):
            for name in files:
                data = Path(dirpath, name).read_bytes()
                assert b"data_35" not in data and "35" not in name.split("-")[0], name
