"""Simulated multi-node training: two `torchrun` invocations on 127.0.0.1, one per "node" and
joined by a c10d rendezvous, train as one process does with the same global batch, and resume
together after one node is killed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from multinode_worker import SlowLinearTask, run_config
from test_loop import HANG_S, _params, load, losses

from training.loop import train

pytestmark = pytest.mark.remote

WORKER = Path(__file__).with_name("multinode_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
EPOCHS = 4  # x 4 updates
UPDATES = EPOCHS * 4
# A peer that vanished without closing its sockets is given up after this long; a killed one
# closes them, so the surviving node stops at once. Bounds the wait for the survivor.
DIST_TIMEOUT_S = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(run: Path, logs: Path, *args: str) -> list[subprocess.Popen]:
    """Two `torchrun` nodes of one job, each its own process group (session); node 0 hosts the
    c10d rendezvous store."""
    port, job = free_port(), f"job{time.monotonic_ns()}"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "ECGPLAT_DIST_TIMEOUT_S": str(DIST_TIMEOUT_S),
    }
    nodes = []
    for node in (0, 1):
        cmd = [
            str(TORCHRUN),
            "--nnodes=2",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id={job}",
            f"--rdzv-conf=is_host={int(node == 0)}",
            "--local-addr=127.0.0.1",
            "--max-restarts=0",
            str(WORKER),
            str(run),
            f"--epochs={EPOCHS}",
            *args,
        ]
        log = (logs / f"node{node}.log").open("a")
        nodes.append(
            subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    return nodes


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a node's whole process tree at once: the torchrun agent and its workers (which
    torchrun starts in sessions of their own), as when the machine is lost."""
    try:
        tree = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    node.wait()


def wait_all(nodes: list[subprocess.Popen], logs: Path) -> None:
    try:
        for n in nodes:
            n.wait(timeout=HANG_S)
    finally:
        for n in nodes:
            kill_node(n)
    assert [n.returncode for n in nodes] == [0, 0], (logs / "node0.log").read_text()


def reference(tmp_path: Path) -> Path:
    """The same run in this one process: the same global batch each update."""
    cfg = run_config(tmp_path / "one", EPOCHS)
    train(cfg, SlowLinearTask(cfg))
    return tmp_path / "one"


def assert_same_training(run: Path, one: Path) -> None:
    """Loss trajectory and final weights of the two-node run equal the one-process run's."""
    two, single = losses(run), losses(one)
    assert sorted(two) == sorted(single) == list(range(1, UPDATES + 1))
    # rank 0 alone logs, once per update (the resumed run dropped what followed the checkpoint)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == UPDATES
    # the 2-row gradient sums differ by the order of a float32 sum, ~eps relative: the tolerance
    # of test_loop's DDP test (its gnorm: 1e-5 relative ~ 80 eps; its weights: 1e-6 absolute)
    for u in single:
        assert two[u] == pytest.approx(single[u], rel=1e-5), u
    a, b = load(run / "checkpoint_last.pt"), load(one / "checkpoint_last.pt")
    assert a["num_updates"] == b["num_updates"] == UPDATES
    assert torch.allclose(_params(a), _params(b), atol=1e-6)
    assert len(a["rng"]["per_rank"]) == 2


def records(run: Path) -> dict[int, dict]:
    return {r["update"]: r for r in map(json.loads, (run / "metrics.jsonl").open())}


def test_collective_timeout_comes_from_the_environment(monkeypatch):
    from datetime import timedelta

    from training.distributed import TIMEOUT_ENV, collective_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout() == timedelta(minutes=30)
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert collective_timeout() == timedelta(seconds=2.5)
    for bad in ("0", "-1", "soon", "nan", "inf"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=TIMEOUT_ENV):
            collective_timeout()


def test_two_nodes_train_as_one_process_and_resume_after_losing_one(tmp_path):
    """Node 1 is killed after a checkpoint; node 0 stops on its own; both restart with --resume.
    Updates 1..k (before the kill) and k+1.. (after the resume) match one process."""
    run = tmp_path / "two"
    nodes = start_nodes(run, tmp_path, "--delay=0.25")
    try:
        deadline = time.monotonic() + HANG_S
        # the checkpoint of update 3 is written before update 4 starts
        while not ((run / "metrics.jsonl").exists() and len(records(run)) >= 4):
            assert nodes[0].poll() is None and nodes[1].poll() is None, "a node ended early"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        kill_node(nodes[1])
        killed = time.monotonic()
        rc = nodes[0].wait(timeout=DIST_TIMEOUT_S + 60)
        stopped_after = time.monotonic() - killed
    finally:
        for n in nodes:
            kill_node(n)
    log = (tmp_path / "node0.log").read_text()
    # its worker's gloo transport saw node 1 go (closed or reset), so torchrun failed
    assert rc != 0 and "gloo/transport" in log and "ChildFailedError" in log, log
    done = load(run / "checkpoint_last.pt")["num_updates"]
    print(f"node 0 stopped {stopped_after:.1f} s after node 1 was killed; checkpoint at {done}")
    assert 3 <= done < UPDATES
    before = records(run)
    restarted = time.time()
    wait_all(start_nodes(run, tmp_path, "--resume"), tmp_path)
    after = records(run)
    # the updates up to the checkpoint stay as logged, the later ones are trained again
    assert all(after[u] == before[u] for u in range(1, done + 1))
    assert all(after[u]["time"] >= restarted for u in range(done + 1, UPDATES + 1))
    assert {r["sample_size"] for r in after.values()} == {2}  # 1 row per rank, summed
    assert_same_training(run, reference(tmp_path))
