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
from helpers import tiny_checkpoint
from typer.testing import CliRunner

from ecgplat.cli import app
from ecgplat.shard_format import StaleShardsError, check_current
from ecgplat.store import ForgottenRecordError, open_store
from ecgplat.store.segment_codec import ShardFiles

runner = CliRunner()
RAW_ID = "SYN0"


@pytest.fixture(scope="module")
def base(synth_store, tmp_path_factory) -> Path:
    """A copy of the synthetic store (72 records, 2 segments each) with feature set "emb"."""
    from retrieval.embed import embed_store

    root = tmp_path_factory.mktemp("forget")
    store = root / "store"
    shutil.copytree(synth_store, store)
    embed_store(store, tiny_checkpoint(root / "pt.pt"), "emb", batch_size=48)
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
    from retrieval.features import load_features
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
    assert (
        _chunks(store, [r for r in range(after.n_segments) if not start <= r < stop])
        == other_chunks
    )
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
    assert after.stored_counts() == after.count()  # info's counts, kept by the forget
    info = runner.invoke(app, ["info", str(store)])
    assert "forgotten 1" in info.output and "records 71" in info.output

    # idempotent: the same command again changes no byte
    files = _files(store)
    assert "already forgotten" in _forget(str(store), "--record", key)
    assert _files(store) == files
    # a re-ingest of the corpus does not bring it back (its path_hash stays in the tombstone)
    summary = ingest("cinc2021", synth_cohort, store, workers=0, progress=False)
    assert summary["records"] == 0 and open_store(store).n_records == 72


def test_forget_patient_splits_and_embeds_without_them(store, base, caplog):
    from ingestion.splits import split_store
    from retrieval.embed import embed_store
    from retrieval.features import load_features

    before = open_store(store)
    pk = before.records["patient_key"][10]
    rows = before.select(patient_key=pk).tolist()
    assert len(rows) == 3
    with caplog.at_level("INFO", logger="ecgplat.store.forget"):
        out = _forget(str(store), "--patient", pk, "--json")
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "3 records (6 segments) masked" in logged and "scrubbed" in logged
    table = (store / "forgotten.json").read_text()
    keys = before.records["record_key"][rows].tolist()
    assert not any(k in logged + table for k in [pk, *keys])
    summary = json.loads(out)
    assert (summary["forgotten"], summary["segments"], summary["generation"]) == (3, 6, 1)
    assert pk not in out
    after = open_store(store)
    assert not set(rows) & set(after.select().tolist())
    assert after.select(patient_key=pk).size == 0
    assert (after.records.loc[rows, "split"] == "").all()
    # a later split leaves them out; a later embed skips them
    split_store(store, valid=0.2, test=0.2, ident=True)
    frame = open_store(store).records
    assert (frame.loc[rows, ["split", "ident_split"]] == "").all().all()
    assert (frame.drop(index=rows)["split"] != "").all()
    embed_store(store, base.parent / "pt.pt", "again", batch_size=48)
    got = load_features(store, "again", "segment")
    assert len(got.record_index) == 138 and not set(rows) & set(got.record_index.tolist())
    assert "already forgotten" in _forget(str(store), "--patient", pk)


def _run_cli(*args: str, stop: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ECGPLAT_FAULT_STOP", None)
    if stop:
        env["ECGPLAT_FAULT_STOP"] = stop
    return subprocess.run(
        [sys.executable, "-m", "ecgplat", "forget", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _state(store: Path) -> dict[str, str]:
    """sha256 of every store file; forgotten.json without its timestamps."""
    out = {}
    for name, data in _files(store).items():
        if name == "forgotten.json":
            table = json.loads(data)
            for op in table["operations"]:
                op.pop("at")
            data = json.dumps(table, sort_keys=True).encode()
        out[name] = hashlib.sha256(data).hexdigest()
    return out


@pytest.fixture(scope="module")
def forgotten(base, tmp_path_factory) -> Path:
    """A copy of ``base`` and its index (``reference.idx`` beside it) from which a real
    ``ecgplat forget`` process, run to completion, removed the patient of record 40: what a
    killed forget and its rerun must leave. Built once for every stop point; read-only."""
    from retrieval.index import index_from_features

    reference = tmp_path_factory.mktemp("forgotten") / "reference"
    shutil.copytree(base, reference)
    index_from_features(reference, "emb", split="all").save(reference.parent / "reference.idx")
    pk = open_store(reference).records["patient_key"][40]
    args = ("--patient", pk, "--index", str(reference.parent / "reference.idx.faiss"))
    ok = _run_cli(str(reference), *args)
    assert ok.returncode == 0, ok.stderr
    return reference


@pytest.mark.parametrize(
    "stop",
    [
        "forget.after_mask",
        "forget.after_first_shard",
        "forget.before_records",
        "forget.before_done",
    ],
)
def test_killed_forget_is_masked_and_a_rerun_completes_it(store, forgotten, stop):
    from retrieval.index import GalleryIndex, index_from_features

    reference = forgotten  # the same store and index, forgotten by an uninterrupted run
    index_from_features(store, "emb", split="all").save(store.parent / "store.idx")
    pk = open_store(store).records["patient_key"][40]
    rows = open_store(store).select(patient_key=pk)
    args = ("--patient", pk, "--index")

    killed = _run_cli(str(store), *args, str(store.parent / "store.idx.faiss"), stop=stop)
    assert killed.returncode == -9, killed.stderr
    mid = open_store(store)
    assert not set(rows) & set(mid.select().tolist())  # masked from the commit point on
    assert mid.forget_pending and mid.summary()["forget_pending"]
    assert mid.stored_counts() is None  # counted from the columns while the scrub is pending
    rerun = _run_cli(str(store), *args, str(store.parent / "store.idx.faiss"))
    assert rerun.returncode == 0, rerun.stderr
    assert "already forgotten" in rerun.stdout and RAW_ID not in rerun.stdout + rerun.stderr
    done = open_store(store)
    assert not done.forget_pending and done.stored_counts() == done.count()
    assert _state(store) == _state(reference)
    a = GalleryIndex.load(store.parent / "store.idx")
    b = GalleryIndex.load(reference.parent / "reference.idx")
    assert a.ids == b.ids and len(a) == 72 - len(rows)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_drop_rows_keeps_the_other_vectors_for_every_kind(kind, tmp_path):
    from retrieval.index import GalleryIndex, build_index

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"r{i}" for i in range(400)]
    index = build_index(x, ids, kind=kind, labels=ids, n_sample=0)
    drop = [0, 7, 399, 150]
    index.drop_rows(drop)
    keep = np.setdiff1d(np.arange(400), drop)
    assert index.ids == [ids[i] for i in keep] and index.labels == index.ids
    loaded = GalleryIndex.load(index.save(tmp_path / "i"))
    assert len(loaded) == 396
    _, rows = loaded.search(x[keep[:50]], 1)
    assert (rows[:, 0] == np.arange(50)).mean() >= 0.9  # each kept vector finds itself
    _, rows = loaded.search(x[drop], 5)
    assert rows.max() < 396
