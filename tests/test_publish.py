"""`ecgplat publish` to a real S3 API server (moto, loopback): the published store reads like the
local one (records, segments, `info`, `evaluate identify`, `index build` + `query`), holds no
secret key, a republish uploads only what changed, and a reader opening the store again and
again while a grown store is republished always sees one of the two snapshots, whole."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import tiny_checkpoint
from typer.testing import CliRunner

from ecgplat.cli import app
from ecgplat.store import open_store, store_file
from ecgplat.store.publish import MANIFEST, PublishError, publish

pytestmark = pytest.mark.remote
runner = CliRunner()
N_A = 36  # records of the first snapshot (12 whole patients); the grown one has all 72


def _embed(store: Path, ckpt: Path) -> None:
    from retrieval.embed import embed_store

    embed_store(store, ckpt, "f", batch_size=16, precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def world(synth_cohort, tmp_path_factory, s3):
    """Store "a" (36 records, split, embedded as "f"), a working copy published to a bucket,
    and "b": that copy grown by the other 36 records, split again and embedded again (not yet
    republished)."""
    from ingestion.pipeline import ingest
    from ingestion.splits import split_store

    root = tmp_path_factory.mktemp("publish")
    part = root / "cohort_a"
    for hea in sorted(synth_cohort.rglob("*.hea"))[:N_A]:
        for f in (hea, hea.with_suffix(".mat")):
            dest = part / f.relative_to(synth_cohort)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
    a, work = root / "a", root / "work"
    ckpt = tiny_checkpoint(root / "pt.pt")
    ingest("cinc2021", part, a, workers=0, progress=False)
    split_store(a, mode="random", valid=0.2, test=0.2, seed=0, ident=True)
    _embed(a, ckpt)
    shutil.copytree(a, work)
    url = f"s3://{s3.new_bucket()}/stores/synth"
    first = publish(work, url)
    ingest("cinc2021", synth_cohort, work, workers=0, progress=False)
    split_store(work, mode="random", valid=0.2, test=0.2, seed=1, ident=True)
    _embed(work, ckpt)
    b = root / "b"
    shutil.copytree(work, b)
    return {"a": a, "b": b, "work": work, "url": url, "first": first, "root": root}


def _features(path, level="record"):
    from retrieval.features import open_features

    feats = open_features(path, "f", level)
    return feats.lineage["n_records"], feats.record_index, feats.rows[:]


def _record_hash(store, i: int) -> str:
    return hashlib.sha256(store.record_segments_raw(i).tobytes()).hexdigest()


def _snapshot(path: Path) -> dict:
    store = open_store(path)
    return {
        "counts": (store.n_records, store.n_segments),
        "records": store.records,
        "hashes": [_record_hash(store, i) for i in range(store.n_records)],
        "features": _features(path),
    }


def _check_view(url: str, snaps: dict) -> str:
    """Open the published store once and check it is one of the snapshots, whole."""
    store = open_store(url)
    [snap] = [s for s in snaps.values() if s["counts"] == (store.n_records, store.n_segments)]
    assert len(store.column("seg_count")) == store.n_records == len(store.labels)
    assert int(store.column("seg_count").sum()) == store.n_segments
    pd.testing.assert_frame_equal(store.records, snap["records"])
    last = store.n_records - 1
    for i in (0, last // 2, last):
        assert _record_hash(store, i) == snap["hashes"][i]
    n, index, rows = _features(url)  # the set's own commit point: one of the two sets
    [fsnap] = [s["features"] for s in snaps.values() if s["features"][0] == n]
    np.testing.assert_array_equal(index, fsnap[1])
    np.testing.assert_array_equal(rows, fsnap[2])
    return "a" if snap is snaps["a"] else "b"


def test_published_store_reads_like_the_local_one(world):
    url, a = world["url"], world["a"]
    assert world["first"]["n_records"] == N_A
    assert store_file(url, "secret.key") is None
    assert store_file(url, ".lock") is None
    local, remote = open_store(a), open_store(url)
    pd.testing.assert_frame_equal(remote.records, local.records)
    every = np.arange(local.n_segments)
    np.testing.assert_array_equal(remote.read_segments_raw(every), local.read_segments_raw(every))
    np.testing.assert_array_equal(remote.labels, local.labels)
    r = runner.invoke(app, ["info", url, "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info.pop("path") == url
    assert info == {k: v for k, v in local.summary().items() if k != "path"}


def test_republish_is_atomic_for_a_reader_and_uploads_only_changes(world, tmp_path):
    url, work = world["url"], world["work"]
    snaps = {"a": _snapshot(world["a"]), "b": _snapshot(world["b"])}
    assert _check_view(url, snaps) == "a"
    seen, errors, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.append(_check_view(url, snaps))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        again = publish(work, url)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    seen.append(_check_view(url, snaps))
    assert seen[-1] == "b" and len(seen) >= 2
    # only what changed went up: the first snapshot's full segment shards stayed
    manifest = json.loads(store_file(url, MANIFEST) or b"{}")
    assert 0 < again["uploaded"] < again["files"] == len(manifest["files"]) + 2
    assert publish(work, url)["uploaded"] == 0  # nothing changed since
    # and the copy holds exactly the local snapshot's files, bit for bit
    import fsspec

    fs, key = fsspec.core.url_to_fs(url)
    for name, (size, sha, _) in manifest["files"].items():
        local = work / name if (work / name).exists() else None
        assert local is not None and local.stat().st_size == size
        assert hashlib.sha256(fs.cat_file(f"{key}/{name}")).hexdigest() == sha
    assert fs.cat_file(f"{key}/commit.json") == (work / "commit.json").read_bytes()


def test_evaluate_identify_and_query_by_url(world, tmp_path):
    url, b = world["url"], world["b"]
    publish(world["work"], url)

    def ok(*args) -> dict:
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout) if "--json" in args else {}

    remote = ok("evaluate", "identify", "--store", url, "--features", "f", "--json")
    local = ok("evaluate", "identify", "--store", b, "--features", "f", "--json")
    assert remote == local
    for name, store in (("remote", url), ("local", b)):
        ok("index", "build", "--store", store, "--features", "f", "--out", tmp_path / name)
    key = open_store(b).records["record_key"].iloc[3]
    got = [
        ok("query", "--index", tmp_path / f"{n}.faiss", "--record", key, "--k", "5", "--json")
        for n in ("remote", "local")
    ]
    assert got[0] == got[1] and len(got[0]) == 5
    assert not list(Path(b).parent.glob("*.faiss"))  # outputs stay where asked, locally


def test_publish_refusals_and_credentials_never_printed(world, s3, tmp_path):
    from s3_server import CREDENTIALS

    store = tmp_path / "uncommitted"
    shutil.copytree(world["a"], store)
    (store / "commit.json").unlink()
    with pytest.raises(PublishError, match="nothing committed"):
        publish(store, world["url"])
    other = f"s3://{s3.new_bucket()}/x"
    publish(world["b"], other)
    with pytest.raises(PublishError, match="holds a newer commit"):
        publish(world["a"], other)
    outputs = []
    for args in (
        ["publish", str(world["a"]), f"s3://{s3.new_bucket()}/p"],
        ["publish", str(world["a"]), "s3://no-such-bucket-ecgplat/p"],
        ["info", "s3://no-such-bucket-ecgplat/p"],
    ):
        r = runner.invoke(app, args, env={"ECGPLAT_DEBUG": None})
        outputs.append((r.exit_code, r.stdout + r.stderr))
    assert outputs[0][0] == 0 and "uploaded" in outputs[0][1], outputs[0]
    for code, text in outputs[1:]:
        assert code == 2 and text.startswith("error: ") and len(text.splitlines()) == 1, text
        assert "s3://no-such-bucket-ecgplat/p: " in text
    for _, text in outputs:
        for value in (CREDENTIALS["AWS_ACCESS_KEY_ID"], CREDENTIALS["AWS_SECRET_ACCESS_KEY"]):
            assert value not in text
