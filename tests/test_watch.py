"""`ecgplat watch` as a real process following a real folder: records land while it runs (one
truncated and finished later, one bad), each good one becomes queryable in the FAISS index,
the bad one is rejected with its reason, nothing is stored twice, SIGTERM ends it cleanly and a
restart adds nothing."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from hostile_files import write_cinc, write_wfdb

from ecgplat.store import open_store

REPO = Path(__file__).parents[1]
CKPT = REPO / "tests" / "fixtures" / "pretrained_tiny" / "w2v_cmsc_rlm_tiny_synth.pt"
RAW_PATIENT = "PAT4242"


def _env() -> dict:
    return dict(
        os.environ,
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        ECGPLAT_CPU_BF16="0",
        PYTHONUNBUFFERED="1",
    )


class Watch:
    """`ecgplat watch ...` in a subprocess, its stdout lines collected by a thread."""

    def __init__(self, *args: str):
        cmd = [sys.executable, "-m", "ecgplat", "watch", *args]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=REPO,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, fragment: str, timeout: float) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            if fragment in line:
                return line
        raise AssertionError(
            f"no line with {fragment!r} within {timeout} s; output so far: {self.seen}; "
            f"stderr: {self.proc.stderr.read() if self.proc.poll() is not None else ''}"
        )

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> tuple[int, list[str], str]:
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        time.sleep(0.2)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return rc, self.seen, self.proc.stderr.read()


def _land(staging: Path, inbox: Path, name: str, sub: str = "", **kw) -> Path:
    """Write a WFDB record in `staging` and move its files into the inbox (data first)."""
    base = write_wfdb(staging, name, **kw)
    dest = inbox / sub
    dest.mkdir(parents=True, exist_ok=True)
    os.replace(f"{base}.dat", dest / f"{name}.dat")
    os.replace(f"{base}.hea", dest / f"{name}.hea")
    return dest / name


def _index_ids(index: Path) -> list[str]:
    from retrieval.index import GalleryIndex, index_file

    if not index_file(index).is_file():
        return []
    return GalleryIndex.load(index).ids


def _wait_index(index: Path, n: int, proc: Watch, timeout: float) -> list[str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ids = _index_ids(index)
        if len(ids) >= n:
            return ids
        assert proc.proc.poll() is None, proc.stop()
        time.sleep(0.2)
    raise AssertionError(f"index holds {_index_ids(index)} after {timeout} s, wanted {n}")


def test_watch_ingests_embeds_and_indexes_records_as_they_land(tmp_path):
    inbox, staging, store, index = (tmp_path / d for d in ("inbox", "stage", "store", "gallery"))
    inbox.mkdir()
    args = [str(inbox), "--store", str(store), "--embed", "emb", "--checkpoint", str(CKPT)]
    args += ["--index", str(index), "--poll", "0.2", "--device", "cpu", "--json"]
    watch = Watch(*args)
    watch.wait_for("watching", timeout=60)

    _land(staging, inbox, "a01", n_sig=12, seed=1)
    _land(staging, inbox, "a02", sub="ward2", n_sig=3, seed=2)
    # truncated: the header is whole, the .dat holds only its first 3,000 bytes for 2.5 s
    full = write_wfdb(staging, "t03", n_sig=12, seed=3)
    data = Path(f"{full}.dat").read_bytes()
    (inbox / "t03.dat").write_bytes(data[:3000])
    shutil.copy(f"{full}.hea", inbox / "t03.hea")
    # bad: a header that is not one (stays unchanged; goes to the reader after two polls)
    (inbox / "bad.hea").write_text("this is not a WFDB header\n", encoding="utf-8")
    (inbox / "bad.dat").write_bytes(b"\0" * 64)
    watch.wait_for("rejected", timeout=30)
    ids = _wait_index(index, 2, watch, timeout=60)
    assert sorted(ids) == ["wfdb/a01", "wfdb/ward2/a02"]
    time.sleep(2.5)
    assert "wfdb/t03" not in _index_ids(index)  # not read while short
    with open(inbox / "t03.dat", "ab") as f:
        f.write(data[3000:])
    _land(staging, inbox, "a04", sub="ward2", n_sig=12, seed=4)
    ids = _wait_index(index, 4, watch, timeout=60)

    rc, lines, err = watch.stop(signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, err
    summary = json.loads(lines[-1])
    good = {"wfdb/a01", "wfdb/ward2/a02", "wfdb/t03", "wfdb/ward2/a04"}
    assert set(ids) == good and len(ids) == 4
    assert set(summary["latencies_s"]) == good
    assert summary["rejected"] == 1
    assert summary["rejects"][0]["path"] == "bad"
    assert "unparsable header" in summary["rejects"][0]["reason"]
    print("watch latencies (s):", summary["latencies_s"], "median", summary["latency_median_s"])
    assert summary["latency_median_s"] <= 5.0, summary

    # the store: each record once, the truncated one whole; the same segments as a batch ingest
    s = open_store(store)
    assert (s.n_records, s.n_rejects) == (4, 1)
    recs = s.records
    assert sorted(recs["record_key"]) == sorted(good)
    assert recs["path_hash"].is_unique
    assert int(recs.set_index("record_key").loc["wfdb/t03", "n_samples_original"]) == 5000
    from ingestion.pipeline import ingest

    ingest("wfdb", inbox, tmp_path / "batch", workers=0, progress=False)
    b = open_store(tmp_path / "batch")
    b_rows = {k: i for i, k in enumerate(b.records["record_key"])}
    for i, key in enumerate(recs["record_key"]):
        np.testing.assert_array_equal(
            s.record_segments_raw(i), b.record_segments_raw(b_rows[key]), err_msg=key
        )

    # the features: every record, equal (to float rounding of other batch sizes) to a full embed
    from retrieval.embed import embed_store
    from retrieval.features import load_features

    embed_store(tmp_path / "batch", CKPT, "emb", device="cpu")
    streamed = load_features(store, "emb", "record")
    full_emb = load_features(tmp_path / "batch", "emb", "record")
    assert sorted(streamed.record_index.tolist()) == [0, 1, 2, 3]
    by_key = dict(zip(b.records["record_key"], full_emb.embeddings, strict=True))
    for i, row in zip(streamed.record_index, streamed.embeddings, strict=True):
        np.testing.assert_allclose(row, by_key[recs["record_key"][i]], atol=1e-5)
    assert streamed.lineage["n_segments"] == s.n_segments
    from retrieval.index import GalleryIndex

    gallery = GalleryIndex.load(index)  # queryable: each record's own embedding finds it first
    _, rows = gallery.search(streamed.embeddings, k=1, lineage=streamed.lineage)
    keys = recs["record_key"].to_numpy()[streamed.record_index]
    assert [gallery.ids[r] for r in rows[:, 0]] == list(keys)

    # restart on the same folder: nothing new, and a clean exit when its time is up
    again = Watch(*args, "--max-seconds", "2")
    rc, lines, err = again.stop(sig=None)
    assert rc == 0, err
    summary = json.loads(lines[-1])
    assert (summary["ingested"], summary["rejected"]) == (0, 0)
    s = open_store(store)
    assert (s.n_records, s.n_rejects) == (4, 1)
    assert len(_index_ids(index)) == 4


def test_watch_ingest_only_cinc_never_prints_the_patient_id(tmp_path):
    """Without --embed: ingest only. A challenge record (MATLAB v4 .mat, size known from the
    header) landing with a raw patient id in its file name is reported under its pseudonym."""
    inbox, store = tmp_path / "inbox", tmp_path / "store"
    inbox.mkdir()
    watch = Watch(str(inbox), "--store", str(store), "--corpus", "cinc2021", "--poll", "0.2")
    watch.wait_for("watching", timeout=60)
    write_cinc(tmp_path / "stage", f"{RAW_PATIENT}_r1", patient=RAW_PATIENT)
    for suffix in (".mat", ".hea"):
        name = f"{RAW_PATIENT}_r1{suffix}"
        os.replace(tmp_path / "stage" / name, inbox / name)
    line = watch.wait_for("queryable", timeout=30)
    rc, lines, err = watch.stop(signal.SIGINT)
    assert rc == 128 + signal.SIGINT, err
    assert all(RAW_PATIENT not in out for out in lines + [err])
    s = open_store(store)
    assert s.n_records == 1
    assert s.records["record_key"][0] in line
    assert "landing to queryable: median" in lines[-1]
