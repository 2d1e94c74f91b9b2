"""Shards exported to S3 and a published store embedded from S3, against a real S3 API server on
loopback (moto's, `tests/s3_server.py`): the objects hold a local export's bytes, the manifest
is written last under a lock object, training streams them from the bucket to the same weights
as from local shards, and `embed --features-out` writes a local feature set bound to the
published store that equals one embedded from the local store."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ecgplat.cli import app

pytestmark = pytest.mark.remote

PRETRAINED = Path(__file__).parent / "fixtures" / "pretrained_tiny" / "w2v_cmsc_rlm_tiny_synth.pt"
TINY = [
    "model.preset=tiny",
    "criterion.num_negatives=4",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.shuffle_buffer=8",
    "logging.log_interval=1",
    "logging.wandb_mode=disabled",
    "optim.max_epoch=0",
    "optim.max_update=3",
    "seed=7",
]


def s3fs_client():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def upload_store(store: Path, url: str) -> None:
    """Publish a committed local store the plain way: every file but secret.key, uploaded
    (commit.json last, the commit point), as a test stand-in for `ecgplat publish`."""
    fs, base = s3fs_client(), url.removeprefix("s3://")
    files = sorted(p for p in store.rglob("*") if p.is_file() and p.name != "secret.key")
    files.sort(key=lambda p: p.name == "commit.json")
    for p in files:
        fs.put_file(str(p), f"{base}/{p.relative_to(store).as_posix()}")


def cli(*args: str) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def test_shards_to_s3_hold_the_local_bytes_and_manifest_last(s3, synth_store, tmp_path):
    bucket = s3.new_bucket()
    url = f"s3://{bucket}/exports/synth"
    local = tmp_path / "local"
    for out in (url, local):
        cli("shards", synth_store, "--split", "train", "--out", out, "--max-count", "16",
            "--no-progress")  # fmt: skip
    fs = s3fs_client()
    names = sorted(p.name for p in local.iterdir() if not p.name.startswith("."))
    assert sorted(o.rsplit("/", 1)[1] for o in fs.ls(url)) == names  # no lock object left
    tars = [n for n in names if n.endswith(".tar")]
    assert len(tars) >= 2
    for name in tars:  # bit for bit
        assert fs.cat_file(f"{url}/{name}") == (local / name).read_bytes(), name
    remote, mine = (
        json.loads(fs.cat_file(f"{url}/_info.json")),
        json.loads((local / "_info.json").read_text()),
    )
    for entry in (remote["train"], mine["train"]):
        entry.pop("created")
    assert remote == mine

    # a re-export with fewer shards: the manifest lists the new ones, the old extra is gone
    cli("shards", synth_store, "--split", "train", "--out", url + "/", "--max-count", "64",
        "--no-progress")  # fmt: skip
    fs = s3fs_client()  # a fresh listing
    again = json.loads(fs.cat_file(f"{url}/_info.json"))["train"]
    assert [s["file"] for s in again["shards"]] == ["train-000000.tar"]
    assert sorted(o.rsplit("/", 1)[1] for o in fs.ls(url)) == ["_info.json", "train-000000.tar"]


def test_one_exporter_at_a_time_and_a_dead_ones_lock_is_taken_over(s3, synth_store, tmp_path):
    import socket

    bucket = s3.new_bucket()
    url = f"s3://{bucket}/shards"
    fs = s3fs_client()
    other = {"host": "elsewhere", "pid": 1, "started": "2026-01-01T00:00:00+00:00"}
    fs.pipe_file(f"{url}/.lock", json.dumps(other).encode())
    args = ["shards", str(synth_store), "--split", "valid", "--out", url, "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "being written by another process" in r.output and "elsewhere pid 1" in r.output
    assert not fs.exists(f"{url}/_info.json")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = {**other, "host": socket.gethostname(), "pid": int(gone.stdout)}
    fs.pipe_file(f"{url}/.lock", json.dumps(dead).encode())  # left by a killed exporter here
    cli(*args)
    assert not fs.exists(f"{url}/.lock")
    assert json.loads(fs.cat_file(f"{url}/_info.json"))["valid"]["samples"] > 0


def _final(run: Path) -> tuple[dict, list]:
    ckpt = torch.load(run / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return ckpt, [(r["update"], r["loss"]) for r in lines if "loss" in r and "update" in r]


def test_training_from_s3_shards_equals_training_from_local_shards(s3, synth_shards, synth_store,
                                                                   tmp_path):  # fmt: skip
    from ingestion.shards import write_shards

    url = f"s3://{s3.new_bucket()}/shards"
    write_shards(synth_store, "train", url, max_count=16)
    write_shards(synth_store, "valid", url, max_count=16)
    torch.set_num_threads(1)
    for src, run in ((synth_shards, "local"), (url, "s3")):
        cli("train", "pretrain", "--config", "w2v_cmsc_rlm", "--shards", src,
            "--out", tmp_path / run, *TINY)  # fmt: skip
    (a, la), (b, lb) = _final(tmp_path / "local"), _final(tmp_path / "s3")
    assert la and la == lb  # the loss trajectory, exactly
    assert a["num_updates"] == b["num_updates"] == 3
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bit for bit


def test_embed_a_published_store_into_a_local_feature_set(s3, synth_store, tmp_path):
    from retrieval.embed import embed_store
    from retrieval.evaluate import evaluate_identification
    from retrieval.features import load_features

    url = f"s3://{s3.new_bucket()}/published/store"
    upload_store(synth_store, url)
    local = tmp_path / "store"
    shutil.copytree(synth_store, local)  # the session store stays read-only
    embed_store(local, PRETRAINED, "emb", device="cpu")
    feats = tmp_path / "feats"
    out = cli("embed", "--store", url, "--checkpoint", PRETRAINED, "--name", "emb",
              "--features-out", feats, "--device", "cpu")  # fmt: skip
    assert f"{feats / 'emb'}:" in out
    assert not s3fs_client().exists(f"{url}/features")  # nothing written into the URL store
    for level in ("segment", "record"):
        got, want = load_features(url, f"{feats}/emb", level), load_features(local, "emb", level)
        np.testing.assert_array_equal(got.embeddings, want.embeddings)  # bit for bit
        np.testing.assert_array_equal(got.record_index, want.record_index)
    # the readers find it by DIR/NAME next to the store URL
    remote_eval = evaluate_identification(url, f"{feats}/emb")
    local_eval = evaluate_identification(local, "emb")
    assert (remote_eval["record"], remote_eval["segment"]) == (
        local_eval["record"],
        local_eval["segment"],
    )
    # bound to its store: another store with a set of that name elsewhere is refused
    from retrieval.features import FeatureError, open_features

    with pytest.raises(FeatureError, match="another store"):
        other = tmp_path / "other"
        shutil.copytree(synth_store, other)
        attrs = json.loads((other / "zarr.json").read_text())
        attrs["attributes"]["store_uuid"] = "0" * 32
        (other / "zarr.json").write_text(json.dumps(attrs))
        open_features(other, f"{feats}/emb")


def test_embed_publishes_its_set_into_the_published_store(s3, synth_store, tmp_path):
    """`embed --store URL --features-out DIR --publish` puts the set into the bucket, where the
    URL's readers take it by NAME, equal to DIR/NAME bit for bit; publishing it again uploads
    nothing; the store's next publish replaces the URL's content by its own sets; a set holding
    a record forgotten since is refused; an overwrite goes up through the build folder."""
    from ecgplat.store import open_store
    from ecgplat.store.forget import forget
    from ecgplat.store.publish import PublishError, publish
    from retrieval.feature_publish import publish_feature_set
    from retrieval.features import list_features, load_features

    local = tmp_path / "store"
    shutil.copytree(synth_store, local)
    url = f"s3://{s3.new_bucket()}/stores/synth"
    publish(local, url)
    feats = tmp_path / "feats"
    embed = ["embed", "--store", url, "--checkpoint", PRETRAINED, "--name", "emb",
             "--features-out", feats, "--device", "cpu", "--publish"]  # fmt: skip
    no_folder = [a for i, a in enumerate(embed) if i not in (7, 8)]  # no --features-out DIR
    r = CliRunner().invoke(app, [str(a) for a in no_folder])
    assert r.exit_code != 0 and "--features-out" in r.output  # a URL and a local folder needed
    out = cli(*embed)
    assert f"{url}/features/emb: uploaded" in out
    assert list_features(url) == ["emb"]
    for level in ("segment", "record"):
        got, want = load_features(url, "emb", level), load_features(url, f"{feats}/emb", level)
        np.testing.assert_array_equal(got.embeddings, want.embeddings)
        np.testing.assert_array_equal(got.record_index, want.record_index)
        assert got.lineage == want.lineage
    by_name = json.loads(cli("evaluate", "identify", "--store", url, "--features", "emb", "--json"))
    by_dir = cli("evaluate", "identify", "--store", url, "--features", f"{feats}/emb", "--json")
    assert by_name == {**json.loads(by_dir), "features": "emb"}
    assert publish_feature_set(url, feats, "emb")["uploaded"] == 0  # nothing changed

    key = str(open_store(local).records["record_key"].iloc[0])
    forget(local, record=key)
    publish(local, url)  # the store's own content: no set "emb" locally
    assert list_features(url) == []
    with pytest.raises(PublishError, match="1 records the published store has forgotten"):
        publish_feature_set(url, feats, "emb")
    cli(*embed, "--overwrite", "--leads", "I,II")  # another set: uploaded via the build folder
    remote = load_features(url, "emb", "segment")
    assert remote.lineage["leads"] == "I,II" == load_features(url, f"{feats}/emb").lineage["leads"]
    assert 0 not in remote.record_index.tolist()  # the forgotten record (row 0) has no row
    names = s3fs_client().find(url.removeprefix("s3://") + "/features")
    assert not [n for n in names if "/.build-" in n]


def test_serve_a_published_store(s3, serve_world, tmp_path):
    """`ecgplat serve --store s3://...` answers as over the local store (a query by key, a
    prediction, a record's metadata and trace), and a republish after a forget moves its change
    key: the index that names the forgotten record is refused, as for a local store."""
    pytest.importorskip("fastapi", reason="the service needs the serve extra")
    import httpx
    from serve_world import LiveServer

    from ecgplat.cli.serve.app import create_app
    from ecgplat.cli.serve.settings import ServeSettings
    from ecgplat.cli.serve.state import ServiceState
    from ecgplat.store import open_store
    from ecgplat.store.forget import forget
    from ecgplat.store.publish import publish
    from retrieval.index import index_from_features

    local = tmp_path / "store"
    shutil.copytree(serve_world["store"], local)
    url = f"s3://{s3.new_bucket()}/stores/serve"
    publish(local, url)
    index_from_features(url, "emb", split="gallery").save(tmp_path / "gallery")
    st = open_store(local)
    gallery = st.column("ident_split") == "gallery"
    key = str(st.column("record_key")[np.flatnonzero(gallery)[1]])
    answers = {}
    for where, store, index in (("local", local, serve_world["index"]),
                                ("url", url, tmp_path / "gallery.faiss")):  # fmt: skip
        conf = ServeSettings(store=store, index=index, checkpoint=serve_world["dx"])
        state = ServiceState(conf)
        with LiveServer(create_app(conf, state)) as live:
            got = [
                httpx.post(f"{live.url}/query", data={"key": key, "k": 5}),
                httpx.post(f"{live.url}/predict", data={"key": key}),
                httpx.get(f"{live.url}/records/{key}"),
                httpx.get(f"{live.url}/records/{key}/trace"),
            ]
            assert all(r.status_code == 200 for r in got), [r.text for r in got]
            answers[where] = [r.json() for r in got]
        if where == "url":
            assert state.poll() is None  # nothing moved
            forget(local, record=key)
            publish(local, url)
            assert state.poll() == "refused" and "forget" in (state.error or "")
    timing = {"ms", "index"}  # the time taken; which index file answered (its uid)
    for a, b in zip(answers["local"], answers["url"], strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == {
            k: v for k, v in b.items() if k not in timing
        }
    assert len(answers["url"][0]["matches"]) == 5 and answers["url"][3]  # not empty answers
