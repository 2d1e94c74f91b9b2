"""WebDataset shards: store -> shards -> read back equals the store; rotation; _info.json."""

import tarfile

import numpy as np
import pytest
import webdataset as wds

from ecgplat.store import open_store
from ingestion.shards import parse_size, read_info, shard_urls, write_shards


def _read_all(urls):
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    return {s["__key__"]: (s["seg.npy"], s["meta.json"]) for s in ds}


def test_fixture_shards_round_trip(synth_store, synth_shards):
    store = open_store(synth_store)
    info = read_info(synth_shards)
    for split in ("train", "valid"):
        entry = info[split]
        idx = store.select(split=split)
        assert entry["samples"] == len(idx) == sum(s["samples"] for s in entry["shards"])
        assert all(s["samples"] <= 16 for s in entry["shards"])
        assert entry["store"]["uuid"] == store.attrs["store_uuid"]
        samples = _read_all(shard_urls(synth_shards, split))
        assert sorted(samples) == [f"r{i:08d}" for i in idx]
        for i in idx:
            segs, meta = samples[f"r{i:08d}"]
            assert segs.dtype == np.int16
            np.testing.assert_array_equal(segs, store.record_segments_raw(i))
            row = store.records.iloc[i]
            assert meta == {
                "record_key": row["record_key"],
                "patient_key": row["patient_key"],
                "source": row["source"],
                "split": split,
                "labels": store.labels[i].astype(int).tolist(),
                "lead_mask": store.lead_masks[i].astype(int).tolist(),
                "record_index": int(i),
            }
        assert entry["segments"] == int(store.records["seg_count"][idx].sum())


def test_size_rotation_reexport_and_names(synth_store, tmp_path):
    out = tmp_path / "sh"
    one = 2 * 12 * 2500 * 2 + 128 + 2 * 1024  # one 2-segment sample with npy/tar overhead
    entry = write_shards(synth_store, "train", out, max_size=3 * one)
    assert all(1 <= s["samples"] <= 3 for s in entry["shards"]) and len(entry["shards"]) > 3
    for s in entry["shards"]:
        with tarfile.open(out / s["file"]) as tar:
            names = tar.getnames()
        assert len(names) == 2 * s["samples"]
        assert all(n.startswith("r") and n.split(".")[0][1:].isdigit() for n in names)
        assert (out / s["file"]).stat().st_size == s["bytes"]
    write_shards(synth_store, "test", out)  # another entry merges into _info.json
    entry2 = write_shards(synth_store, "train", out, max_count=1000)  # fewer shards now
    assert len(entry2["shards"]) == 1
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar"]
    assert set(read_info(out)) == {"train", "test"}
    assert not list(out.glob(".*tmp"))


def test_errors(synth_store, tmp_path):
    with pytest.raises(ValueError, match="no records"):
        write_shards(synth_store, "nosuchsplit", tmp_path)
    with pytest.raises(ValueError, match="bad shard name"):
        write_shards(synth_store, "train", tmp_path, name="../evil")
    assert parse_size("256MB") == 256_000_000 and parse_size("1GiB") == 2**30
    with pytest.raises(ValueError):
        parse_size("12 parsecs")
