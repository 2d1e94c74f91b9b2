"""`ecgplat ingest` against a real Dask cluster: a `dask scheduler` and a `dask worker` process
started here on 127.0.0.1. The store equals the in-process one (bit-equal segments, same keys
and rejects) when the worker reads SRC itself (shared filesystem) and, with `--send-bytes`,
when SRC is hidden from the worker by a private mount namespace. Without `--send-bytes`, such a
worker rejects every record with a clear reason instead of crashing the run."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hostile_files import edit_header, write_wfdb
from store_compare import assert_same_store

from ecgplat.store import open_store
from ingestion.pipeline import ingest
from ingestion.worker import SRC_NOT_VISIBLE

REPO = Path(__file__).parents[1]
DASK = Path(sys.executable).parent / "dask"


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _can_hide() -> bool:
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs none /mnt"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def _corpus(root: Path) -> Path:
    """A WFDB folder: good records (formats 16 and 212, 3 and 12 leads, in a subfolder) and
    bad ones (truncated data, missing data file, a header naming a file outside SRC, a data
    file reached through a symbolic link)."""
    for i, (fmt, n_sig) in enumerate([("16", 12), ("212", 3), ("16", 2), ("16", 12)]):
        write_wfdb(root / ("ward" if i % 2 else ""), f"r{i}", n_sig=n_sig, fmt=fmt, seed=i)
    short = write_wfdb(root, "short", n_sig=12, seed=9)
    data = Path(f"{short}.dat").read_bytes()
    Path(f"{short}.dat").write_bytes(data[: len(data) // 3])
    Path(f"{write_wfdb(root, 'nodata', seed=10)}.dat").unlink()
    edit_header(
        write_wfdb(root, "escape", seed=11),
        lambda ls: [ls[0]] + [ln.replace("escape.dat", "../escape.dat") for ln in ls[1:]],
    )
    link = write_wfdb(root, "linked", seed=12)
    os.replace(f"{link}.dat", root / "ward" / "target.bin")
    os.symlink(root / "ward" / "target.bin", f"{link}.dat")
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(scheduler address, shared SRC, hidden SRC, reference store ingested in-process)."""
    base = tmp_path_factory.mktemp("cluster")
    shared = _corpus(base / "shared" / "src")
    hidden_parent = base / "hidden"
    hidden = hidden_parent / "src"
    shutil.copytree(shared, hidden, symlinks=True)
    ref = base / "ref"
    ingest("wfdb", shared, ref, workers=0, progress=False)

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [
        subprocess.Popen(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    worker = f"{DASK} worker {address} --host 127.0.0.1 --nthreads 1 --no-nanny --no-dashboard"
    worker += f" --local-directory {base / 'worker'}"
    hide = _can_hide()
    if hide:  # the worker sees an empty tmpfs where the hidden SRC's parent is
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c"]
        cmd += [f"mount -t tmpfs none {hidden_parent} && exec {worker}"]
    else:
        cmd = ["sh", "-c", f"exec {worker}"]
    procs.append(
        subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    )
    try:
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=90)
        yield address, shared, hidden if hide else None, ref
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _cli_ingest(src: Path, store: Path, address: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ecgplat", "ingest", "wfdb", str(src), "--store", str(store)]
    cmd += ["--scheduler", address, "--batch-size", "3", "--no-progress", *extra]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)


def test_cluster_ingest_equals_in_process(cluster, tmp_path):
    address, shared, _, ref = cluster
    out = _cli_ingest(shared, tmp_path / "s", address)
    assert out.returncode == 0, out.stderr
    assert_same_store(ref, tmp_path / "s")
    s = open_store(tmp_path / "s")
    assert s.n_records == 4 and s.n_rejects == 4  # the corpus itself is not trivially equal
    reasons = " | ".join(s.rejects["reason"])
    for fragment in ("truncated", "missing signal file", "outside SRC", "symbolic link"):
        assert fragment in reasons


def test_send_bytes_to_a_worker_that_cannot_see_src(cluster, tmp_path):
    address, _, hidden, ref = cluster
    if hidden is None:
        pytest.skip("no private mount namespace here (unshare -m refused): cannot hide SRC")
    # shared-filesystem mode: every record is rejected with the reason, nothing crashes
    out = _cli_ingest(hidden, tmp_path / "blind", address)
    assert out.returncode == 0, out.stderr
    blind = open_store(tmp_path / "blind")
    assert blind.n_records == 0 and blind.n_rejects == 8
    assert set(blind.rejects["reason"]) == {SRC_NOT_VISIBLE}
    # send-bytes mode: the same store as reading SRC in-process
    out = _cli_ingest(hidden, tmp_path / "sent", address, "--send-bytes")
    assert out.returncode == 0, out.stderr
    assert_same_store(ref, tmp_path / "sent")
    s = open_store(tmp_path / "sent")
    np.testing.assert_array_equal(
        s.read_segments_raw(np.arange(s.n_segments)),
        open_store(ref).read_segments_raw(np.arange(s.n_segments)),
    )


def test_send_bytes_in_process_gives_the_same_store(cluster, tmp_path):
    """The send-bytes path without a cluster (workers=0) over the same hostile folder."""
    _, shared, _, ref = cluster
    ingest("wfdb", shared, tmp_path / "s", workers=0, progress=False, send_bytes=True)
    assert_same_store(ref, tmp_path / "s")
    with pytest.raises(ValueError, match="--send-bytes"):
        ingest("ptbxl", shared, tmp_path / "p", workers=0, progress=False, send_bytes=True)
