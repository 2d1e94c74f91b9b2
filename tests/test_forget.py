"""`ecgplat forget`: a withdrawn record leaves every read, export and index, and its bytes leave
the disk (raw-byte scans before/after), while every other record stays bit-identical; a forget
killed at any step is completed by a rerun."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ecgplat.cli import app
from ecgplat.shard_format import StaleShardsError, check_current
from ecgplat.store import ForgottenRecordError, open_store
from ingestion.segment_codec import ShardFiles

runner = CliRunner()
RAW_ID = "SYN0"


def _tiny_checkpoint(path: Path) -> Path:
    import torch

    from training.models import build_encoder, save_checkpoint

    torch.manual_seed(0)
    enc = build_encoder("tiny")
    return save_checkpoint(
        path,
        kind="pretrain",
        encoder_config=enc.cfg,
        model={f"encoder.{k}": v for k, v in enc.state_dict().items()},
    )


@pytest.fixture(scope="module")
def base(synth_store, tmp_path_factory) -> Path:
    """A copy of the synthetic store (72 records, 2 segments each) with feature set "emb"."""
    from retrieval.embed import embed_store

    root = tmp_path_factory.mktemp("forget")
    store = root / "store"
    shutil.copytree(synth_store, store)
    embed_store(store, _tiny_checkpoint(root / "pt.pt"), "emb", batch_size=48)
    return store


@pytest.fixture
def store(base, tmp_path) -> Path:
    out = tmp_path / "store"
    shutil.copytree(base, out)
    return out


def _files(store: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _chunks(store: Path, seg_rows) -> list[bytes]:
    """The stored (encoded) chunk bytes of the given segment rows, read from the shard files."""
    files = ShardFiles(store, 0)
    return [files._read(int(r) // 64)[int(r) % 64] for r in seg_rows]


def _forget(*args: str) -> str:
    r = runner.invoke(app, ["forget", *args], env={"ECGPLAT_DEBUG": "1"})
    assert r.exit_code == 0, r.output
    assert RAW_ID not in r.output
    return r.output


def test_forget_record_everywhere(store, synth_cohort, tmp_path):
    from ingestion.pipeline import ingest
    from ingestion.shards import write_shards
    from retrieval.embed import load_features
    from retrieval.index import GalleryIndex, StaleIndexError, index_from_features

    before = open_store(store)
    i, key = 5, before.records["record_key"][5]
    path, pk = before.records["path"][5], before.records["patient_key"][5]
    start, stop = before.record_segment_range(i)
    others = [j for j in range(before.n_records) if j != i]
    raw_before = {j: before.record_segments_raw(j) for j in others}
    own_chunks = _chunks(store, range(start, stop))
    other_chunks = _chunks(store, [r for r in range(before.n_segments) if not start <= r < stop])
    blob = b"".join(_files(store).values())
    assert all(c in blob for c in own_chunks)  # the scan can find them
    feats = load_features(store, "emb", "segment")
    updated, stale = tmp_path / "updated", tmp_path / "stale"
    for out, level in ((updated, "segment"), (stale, "record")):
        index_from_features(store, "emb", split="all", level=level).save(out)
    write_shards(store, "all", tmp_path / "shards", progress=False)
    check_current(tmp_path / "shards", ["all"])  # fresh before

    out = _forget(str(store), "--record", key, "--index", str(updated) + ".faiss")
    assert "forgot 1 records (2 segments)" in out and key not in out

    after = open_store(store)
    assert i not in after.select() and len(after.select()) == 71
    with pytest.raises(ForgottenRecordError):
        after.record_segments(i)
    with pytest.raises(ForgottenRecordError):
        after.read_segments([0, start + 1])
    for j in others:
        np.testing.assert_array_equal(after.record_segments_raw(j), raw_before[j])
    assert _chunks(store, range(start, stop)) == [None, None]
    assert _chunks(
        store, [r for r in range(after.n_segments) if not start <= r < stop]
    ) == other_chunks
    blob = b"".join(_files(store).values())
    assert not any(c in blob for c in own_chunks)
    # the record row is a tombstone in the files themselves, not only masked by the reader
    root = after.root
    for column in ("record_key", "record_id", "path", "patient_key", "raw_codes"):
        assert str(root[f"records/{column}"][i]) == "", column
    assert not root["records/labels"][i].any() and np.isnan(root["records/age"][i])
    assert str(root["records/source"][i]) == "cinc2021"
    assert path.encode() not in blob and key.encode() not in blob
    # features: rows zeroed on disk, not returned by reads
    on_disk = np.asarray(root["features/emb/segment/embedding"][:])
    gone = feats.record_index == i
    assert gone.sum() == 2 and not on_disk[gone].any()
    np.testing.assert_array_equal(on_disk[~gone], feats.embeddings[~gone])
    assert i not in load_features(store, "emb", "record").record_index
    # indexes: the one passed lost the record's rows, the other is refused as stale
    idx = GalleryIndex.load(updated)
    assert len(idx) == 142 and not any(r.startswith(key + "#") for r in idx.ids)
    with pytest.raises(StaleIndexError, match="forget"):
        GalleryIndex.load(stale)
    # shards: the export made before is stale, a new one skips the record
    with pytest.raises(StaleShardsError, match="forget generation 0"):
        check_current(tmp_path / "shards", ["all"])
    entry = write_shards(store, "all", tmp_path / "shards", progress=False)
    assert entry["samples"] == 71
    check_current(tmp_path / "shards", ["all"])
    summary = after.summary()
    assert (summary["records"], summary["segments"], summary["forgotten"]) == (71, 142, 1)
    assert not summary["forget_pending"] and pk not in json.dumps(summary)
    info = runner.invoke(app, ["info", str(store)])
    assert "forgotten 1" in info.output and "records 71" in info.output

    # idempotent: the same command again changes no byte
    files = _files(store)
    assert "already forgotten" in _forget(str(store), "--record", key)
    assert _files(store) == files
    # a re-ingest of the corpus does not bring it back (its path_hash stays in the tombstone)
    summary = ingest("cinc2021", synth_cohort, store, workers=0, progress=False)
    assert summary["records"] == 0 and open_store(store).n_records == 72
