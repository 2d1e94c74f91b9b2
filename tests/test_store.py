"""The feature store: schema, read API against the source files, privacy, a second corpus."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
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
        assert (
            store.labels[i].tolist() == codes_to_multihot(manifest["records"][i]["codes"]).tolist()
        )
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
    for row, j in zip(got, idx, strict=True):
        rec = store.segment_record_index[j]
        np.testing.assert_array_equal(row, store.record_segments(rec)[store.segment_number[j]])
    assert got.dtype == np.float32
    with pytest.raises(IndexError):
        store.read_segments([144])


def test_select_filters(synth_store):
    store = open_store(synth_store)
    frame = store.records
    for split in ("train", "valid", "test"):
        assert (
            store.select(split=split).tolist() == np.flatnonzero(frame["split"] == split).tolist()
        )
    pk = frame["patient_key"][4]
    assert store.select(patient_key=pk).tolist() == [3, 4, 5]
    both = store.select(split=["valid", "test"], ident_split="gallery")
    assert set(both) == set(
        np.flatnonzero(frame["split"].isin(["valid", "test"]) & (frame["ident_split"] == "gallery"))
    )


def test_interactive_reads_leave_the_record_table_unloaded(synth_store):
    """select, record_segments and summary on a fresh view read only the columns they need
    (a million-record table takes seconds to load) and agree with the full table."""
    frame = open_store(synth_store).records
    store = open_store(synth_store)
    for split in ("train", "valid", "test"):
        expected = np.flatnonzero(frame["split"].to_numpy() == split)
        assert store.select(split=split).tolist() == expected.tolist()
    gallery_valid = store.select(split="valid", ident_split="gallery")
    assert (
        gallery_valid.tolist()
        == np.flatnonzero(
            (frame["split"] == "valid") & (frame["ident_split"] == "gallery")
        ).tolist()
    )
    for i in (0, 37, len(frame) - 1):
        start, count = int(frame["seg_start"][i]), int(frame["seg_count"][i])
        assert store.record_segment_range(i) == (start, start + count)
        assert store.record_segments(i).shape == (count, 12, 2500)
    fresh = open_store(synth_store)
    assert fresh.summary() == store.summary()
    assert not fresh._columns and "_splits" not in fresh.__dict__  # counts kept at the commit
    summary = store.summary()
    assert "records" not in store.__dict__  # the table was never built
    assert {k: summary[k] for k in store.count()} == store.count()
    assert summary["patients"] == len(set(frame["patient_key"]))
    splits, n = np.unique(frame["split"].to_numpy().astype(str), return_counts=True)
    assert summary["per_split"] == dict(zip(splits.tolist(), n.tolist(), strict=True))
    assert sum(summary["per_ident_split"].values()) == len(frame)
    assert summary == open_store(synth_store).summary()
    with pytest.raises(KeyError):
        store.column("labels")  # not a scalar column
    assert store.records["split"].tolist() == frame["split"].tolist()  # still loads on demand


def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        open_store(tmp_path)
    (tmp_path / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})
    )
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


# --- the segments array written as shard files from worker-encoded chunks ----------------------


def _fake_batch(seq, counts, rng, prefix="r"):
    """A RecordBatch of len(counts) records with counts[i] random segments each."""
    from ecgplat.store.writer import pack_batch
    from ingestion.conditioning import ConditionedRecord

    recs = [
        ConditionedRecord(
            segments=rng.integers(-3000, 3000, (n, 12, 2500)).astype(np.int16),
            lead_mask=np.ones(12, bool),
            n_samples_original=2500 * n,
            fs_original=500.0,
            source="wfdb",
            record_id=f"{prefix}{seq}_{i}",
            path=f"{prefix}{seq}_{i}",
        )
        for i, n in enumerate(counts)
    ]
    recs[0].segments[0] = 0  # an all-zero segment (zarr itself would not store such a chunk)
    return pack_batch(seq, recs, [], b"k" * 32), np.concatenate([r.segments for r in recs])


def test_direct_shard_writes_read_back_across_commits_and_reopens(tmp_path):
    from ecgplat.store.writer import StoreWriter

    rng = np.random.default_rng(1)
    store, expected = tmp_path / "s", []
    plan = [
        ([3, 1], True),
        ([30, 40], False),
        ([1], True),
        ([64, 2], True),
        ([5], "reopen"),
        ([60, 60], "crash"),
    ]
    w = StoreWriter(store)
    for seq, (counts, action) in enumerate(plan):
        batch, segs = _fake_batch(seq, counts, rng)
        w.append(batch)
        if action == "crash":  # appended (full shards already written) but never committed
            break
        expected.append(segs)
        if action:
            w.commit()
        if action == "reopen":
            w.close()
            w = StoreWriter(store)
    w.close()
    expected = np.concatenate(expected)
    with StoreWriter(store) as w:  # the crashed tail is dropped, the partial shard kept
        assert w.n_segments == len(expected) == 146
        batch, segs = _fake_batch(99, [20], rng)
        w.append(batch)
        w.commit()
    expected = np.concatenate([expected, segs])
    reader = open_store(store)
    np.testing.assert_array_equal(reader.read_segments_raw(np.arange(reader.n_segments)), expected)
    assert reader.root["segments"].shape[0] == len(expected)
    assert not list(store.rglob("*.partial"))
    shards = sorted(int(p.name) for p in (store / "segments" / "c").iterdir())
    assert shards == [0, 1, 2]  # 166 segments = 3 shards of 64; the crashed run's extra is gone


def test_store_with_an_older_segment_layout_is_appended_through_zarr(tmp_path, monkeypatch):
    import ecgplat.store.schema as S
    from ecgplat.store.writer import StoreWriter

    rng = np.random.default_rng(2)
    monkeypatch.setattr(S, "SEGMENT_CHUNK", 8)
    monkeypatch.setattr(S, "SEGMENT_SHUFFLE", "shuffle")
    with StoreWriter(tmp_path / "s") as w:
        batch, first = _fake_batch(0, [3, 2], rng)
        w.append(batch)
        w.commit()
    monkeypatch.undo()
    with StoreWriter(tmp_path / "s") as w:
        assert w._shards is None and w.root["segments"].chunks[0] == 8
        batch, second = _fake_batch(1, [4], rng)
        w.append(batch)
        w.commit()
    reader = open_store(tmp_path / "s")
    np.testing.assert_array_equal(
        reader.read_segments_raw(np.arange(9)), np.concatenate([first, second])
    )


def test_column_at_reads_the_asked_records_only(synth_store):
    """`column_at` (a gallery's keys) equals the whole column indexed, in any order and with
    repeats, caches nothing, and refuses an index outside the store."""
    frame = open_store(synth_store).records
    at = np.array([5, 0, 5, len(frame) - 1, 17])
    for name in ("record_key", "patient_key", "source", "fs_original", "seg_count"):
        fresh = open_store(synth_store)
        got = fresh.column_at(name, at)
        assert got.tolist() == frame[name].to_numpy()[at].tolist()
        assert not fresh._columns and "records" not in fresh.__dict__
        assert fresh.column_at(name, np.zeros(0, dtype=np.int64)).shape == (0,)
    codes, values = open_store(synth_store).column_codes("patient_key")
    assert values[codes].tolist() == frame["patient_key"].tolist()
    with pytest.raises(IndexError, match="out of range"):
        open_store(synth_store).column_at("record_key", [len(frame)])
    with pytest.raises(KeyError):
        open_store(synth_store).column_at("labels", [0])


@pytest.mark.parametrize("distinct", [1, 3, 8, 9, 50])
def test_column_codes_of_few_and_many_values_equal_pandas(distinct):
    """Both ways to code a string column (a comparison per value for a few values, a sort for
    many; also when more values appear after the first 4,096 entries) give pandas' sorted
    factorisation."""
    from ecgplat.store.read import STR, _str_codes

    rng = np.random.default_rng(distinct)
    names = np.array([f"v{i:03d}" for i in range(distinct)] + ["", "é"], dtype=object)
    column = names[rng.integers(0, 3, 140_000)]  # few values first; sorted in several windows
    column[5000:] = names[rng.integers(0, len(names), 135_000)]
    for values in (column.astype(STR), column):
        codes, distinct_values = _str_codes(values)
        want_codes, want_values = pd.factorize(column, sort=True)
        assert codes.tolist() == want_codes.tolist()
        assert list(distinct_values) == list(want_values)
