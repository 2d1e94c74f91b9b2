"""`ecgplat ingest CORPUS s3://bucket/prefix/` against a real S3 server (moto, on 127.0.0.1): the
Dask workers fetch the records from the bucket themselves, and the store is bit-identical to a
local ingest of the same files (same key: same pseudonyms and path hashes), rejects and reasons
included; a header failing the readers' checks costs no data-file fetch; no credential travels in
a task; a worker killed while it holds records' files costs nothing and leaves no file behind."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hostile_files import write_cinc, write_wfdb
from s3_server import CREDENTIALS
from store_compare import assert_same_store
from test_dask_cluster import _corpus, _free_port

from ecgplat.store import open_store
from ingestion.pipeline import ingest
from ingestion.readers.options import ReadOptions

pytestmark = pytest.mark.remote

REPO = Path(__file__).parents[1]
DASK = Path(sys.executable).parent / "dask"
OPTS = ReadOptions(max_seconds=20.0)  # the 30 s record "long" is refused from its header


def _wfdb_corpus(root: Path) -> tuple[Path, str]:
    """``test_dask_cluster``'s hostile WFDB folder (good records; truncated, missing data file,
    a header naming a file outside SRC) without its symbolic link (a bucket has none), plus a
    record longer than OPTS allow."""
    _corpus(root)
    for name in ("linked.hea", "linked.dat", "ward/target.bin"):
        (root / name).unlink()
    write_wfdb(root / "ward", "long", n_sig=12, seconds=30.0, seed=13)
    return root, "ward/long"


def _cinc_corpus(root: Path) -> tuple[Path, str]:
    for i in range(4):
        write_cinc(root / "g1", f"R{i:02d}", patient=f"P{i % 2}")
    (root / "g1" / "R02.mat").unlink()  # a reject whose reason is redacted by its patient
    write_cinc(root / "g2", "P9_long", seconds=30.0, patient="P9")  # its path names its patient
    return root, "g2/P9_long"


def _upload(local: Path, url: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.pipe_file(f"{url[5:]}{path.relative_to(local).as_posix()}", path.read_bytes())


def _twin_stores(tmp: Path) -> tuple[Path, Path]:
    """Two empty stores sharing one key (a copy of a fresh one): equal ingests, equal stores."""
    from ecgplat.store.writer import StoreWriter

    with StoreWriter(tmp / "ref"):
        pass
    shutil.copytree(tmp / "ref", tmp / "out")
    return tmp / "ref", tmp / "out"


@pytest.mark.parametrize("corpus", ["wfdb", "cinc2021"])
def test_bucket_ingest_in_process_equals_local(s3, tmp_path, corpus):
    src, long_rel = (_wfdb_corpus if corpus == "wfdb" else _cinc_corpus)(tmp_path / "src")
    url = f"s3://{s3.new_bucket()}/raw/"
    _upload(src, url)
    ref, out = _twin_stores(tmp_path)
    ingest(corpus, src, ref, workers=0, progress=False, opts=OPTS)
    if corpus == "wfdb":  # through the command line (in this process)
        from typer.testing import CliRunner

        from ecgplat.cli import app

        args = ["ingest", corpus, url, "--store", str(out), "--workers", "0", "--json"]
        args += ["--no-progress"]
        r = CliRunner().invoke(app, [*args, "--batch-size", "3", "--max-duration", "20"])
        assert r.exit_code == 0, r.output
        summary = json.loads(r.stdout)
    else:
        summary = ingest(corpus, url, out, workers=0, progress=False, opts=OPTS, batch_size=3)
    assert_same_store(ref, out, same_secret=True)
    s = open_store(out)
    assert summary["listed"] == s.n_records + s.n_rejects
    reasons = " | ".join(s.rejects["reason"])
    assert "exceeds the maximum 20 s" in reasons
    if corpus == "wfdb":
        assert s.n_records == 4 and s.n_rejects == 4
        for fragment in ("truncated", "missing signal file", "outside SRC"):
            assert fragment in reasons
    else:
        assert s.n_records == 3 and s.n_rejects == 2
        assert "P9" not in " ".join(s.rejects["path"])  # redacted from the header's #Patient

    # the header is checked before a data file is fetched: "long" sends only its data size
    from ingestion.bucket_files import BucketSource, _BucketTree
    from ingestion.sent_files import record_payload

    payload = record_payload(_BucketTree(url), long_rel, OPTS)
    data = {k: v for k, v in payload.items() if not k.endswith(".hea")}
    assert [v[0] for v in data.values() if isinstance(v, tuple)] == ["size"], payload
    # a task carries the URL and paths, never a credential
    fn, args = BucketSource(corpus, url).task(corpus, ["r0"], 0, b"k" * 32, OPTS)
    blob = pickle.dumps((fn, args))
    assert all(v.encode() not in blob for v in CREDENTIALS.values())
    assert s3.endpoint.encode() not in blob


def _start(cmd: list, env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_workers(address: str, n: int) -> None:
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(n, timeout=90)


def test_cluster_reads_the_bucket_and_survives_a_killed_worker(s3, tmp_path):
    """A scheduler and two worker processes, neither seeing SRC; worker A is SIGKILLed (fault
    point) right after it laid out a record's files. The ingest still equals the local one and
    no record folder is left in the workers' temporary folder."""
    src, _ = _wfdb_corpus(tmp_path / "src")
    url = f"s3://{s3.new_bucket()}/raw/"
    _upload(src, url)
    ref, out = _twin_stores(tmp_path)
    ingest("wfdb", src, ref, workers=0, progress=False, opts=OPTS)
    shutil.rmtree(src)  # nothing below reads a local copy
    wtmp = tmp_path / "wtmp"
    wtmp.mkdir()
    env = dict(os.environ, **s3.env, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TMPDIR=str(wtmp))
    env.pop("ECGPLAT_FAULT_STOP", None)
    address = f"tcp://127.0.0.1:{_free_port()}"
    worker = [DASK, "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny"]
    worker += ["--no-dashboard", "--local-directory", str(tmp_path / "dask")]
    sched = [DASK, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1]]
    procs = [_start([*sched, "--no-dashboard"], env)]
    try:
        dying = _start(worker, dict(env, ECGPLAT_FAULT_STOP="bucket.laid_out"))
        procs += [dying, _start(worker, env)]
        _wait_workers(address, 2)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TMPDIR", str(wtmp))  # the driver's listing skeleton
            mp.setattr(tempfile, "tempdir", None)
            summary = ingest(
                "wfdb", url, out, scheduler=address, batch_size=2, progress=False, opts=OPTS
            )
        assert summary["records"] == 4, summary
        assert dying.wait(timeout=30) == -signal.SIGKILL  # it did die holding records' files
    finally:  # the ingest is over: nothing of the cluster needs a graceful end
        for proc in procs:
            proc.kill()
            proc.wait()
    assert_same_store(ref, out, same_secret=True)
    left = [p for p in wtmp.rglob("*") if p.suffix in (".hea", ".dat")]
    assert left == [], left
    assert list((wtmp / f"ecgplat-sent-{os.getuid()}").iterdir()) == []
    assert open_store(out).n_rejects == 4
