"""Stores and shards read over HTTP from a real loopback server with byte ranges (as object
stores serve them): a store opened by URL through zarr's fsspec support reads the same records,
splits and segments as on disk, without its secret key; WebDataset shards listed by URL (and by
a `pipe:` command) yield the same samples and the same first training batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ecgplat.store import open_store, store_file

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def served(synth_store, synth_shards, tmp_path_factory):
    """(base URL, local store, local shards): a copy of the store (without secret.key) and of
    the shards under one folder, served on 127.0.0.1 for at most 300 s."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(synth_store, root / "store", ignore=shutil.ignore_patterns("secret.key"))
    shutil.copytree(synth_shards, root / "shards")
    server = subprocess.Popen(
        [sys.executable, str(HERE / "range_http.py"), str(root), "300"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(server.stdout.readline())
        yield f"http://127.0.0.1:{port}", synth_store, synth_shards
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_store_over_http_reads_like_the_local_store(served):
    base, local_path, _ = served
    remote, local = open_store(f"{base}/store"), open_store(local_path)
    assert store_file(f"{base}/store", "secret.key") is None  # a reader never needs the key
    assert (remote.n_records, remote.n_segments) == (local.n_records, local.n_segments)
    pd.testing.assert_frame_equal(remote.records, local.records)
    every = np.arange(local.n_segments)
    np.testing.assert_array_equal(remote.read_segments_raw(every), local.read_segments_raw(every))
    np.testing.assert_array_equal(remote.record_segments_raw(5), local.record_segments_raw(5))
    np.testing.assert_array_equal(remote.select(split="valid"), local.select(split="valid"))
    summary = {k: v for k, v in remote.summary().items() if k != "path"}
    assert summary == {k: v for k, v in local.summary().items() if k != "path"}
    with pytest.raises(ValueError, match="read-only"):
        open_store(f"{base}/store", mode="r+")
    with pytest.raises(FileNotFoundError, match="no ecgplat store"):
        open_store(f"{base}/nothing-here")


def test_info_command_takes_a_store_url(served):
    base, local_path, _ = served
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "ecgplat", "info", f"{base}/store", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    remote = json.loads(out.stdout)
    assert remote["path"] == f"{base}/store"
    assert remote["records"] == open_store(local_path).n_records


def test_shards_by_url_and_pipe_yield_the_local_samples(served):
    from training.data import BatchStream, StreamSpec, iter_records, shard_set

    base, _, local_shards = served
    local = shard_set(local_shards, "train")
    remote = shard_set(f"{base}/shards", "train")
    assert (remote.samples, remote.segments) == (local.samples, local.segments)
    assert [u.rsplit("/", 1)[1] for u in remote.urls] == [u.rsplit("/", 1)[1] for u in local.urls]
    for url_r, url_l in zip(remote.urls, local.urls, strict=True):
        got, want = list(iter_records(url_r)), list(iter_records(url_l))
        assert [k for k, _, _ in got] == [k for k, _, _ in want]
        for (_, a, ma), (_, b, mb) in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
            assert ma == mb
    piped = shard_set(f"pipe:cat {local_shards}/train-{{000000..000001}}.tar", "train")
    assert [k for k, _, _ in iter_records(piped.urls[1])] == [
        k for k, _, _ in iter_records(local.urls[1])
    ]

    def first_batch(shards):
        spec = StreamSpec(shards=shards, mode="segments", batch_size=8, seed=3)
        return next(iter(BatchStream(spec)))

    a, b = first_batch(remote), first_batch(local)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
