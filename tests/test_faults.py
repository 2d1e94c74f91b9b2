"""Crash safety and bad input: SIGKILL mid-ingest, uncommitted tails, rejects per fault kind."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from store_compare import assert_same_store

from ecgplat.store import open_store, read_commit
from ecgplat.store.writer import StoreWriter
from ingestion.pipeline import ingest, process_batch

ROOT = Path(__file__).parents[1]


def _ingest_killed_at_commit(src, store, records: int) -> int:
    """Run an ingest (batches of 2, a commit after each) in a subprocess that SIGKILLs itself in
    the commit that would make ``records`` records visible, after that batch's rows are written
    (the writer's ECGPLAT_FAULT_STOP hook); returns the records committed when it died."""
    code = (
        "from ingestion.pipeline import ingest; "
        f"ingest('cinc2021', {str(src)!r}, {str(store)!r}, workers=0, batch_size=2, "
        "progress=False, commit_interval=0)"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", ECGPLAT_FAULT_STOP=f"commit:{records}")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    return read_commit(store)["n_records"] if (store / "commit.json").exists() else 0


def test_sigkill_then_rerun_equals_uninterrupted(synth_cohort, synth_store, tmp_path):
    store = tmp_path / "store"
    first = _ingest_killed_at_commit(synth_cohort, store, 4)
    # killed in the 2nd commit: the 1st batch visible, the 2nd written past the commit point
    assert first == 2 and open_store(store).n_records == 2
    assert zarr.open_array(store / "segments", mode="r").shape[0] > 2 * first
    second = _ingest_killed_at_commit(synth_cohort, store, 14)  # resumes, dies in its 6th commit
    assert second == 12
    reader = open_store(store)  # a killed store is readable at its last commit
    assert reader.n_records == read_commit(store)["n_records"] == second
    summary = ingest("cinc2021", synth_cohort, store, workers=0, progress=False)
    assert summary["skipped"] + summary["records"] == 72 and summary["skipped"] == second
    assert_same_store(store, synth_store)
    assert not list(store.rglob("*.partial"))


def test_uncommitted_tail_is_dropped(synth_cohort, synth_store, tmp_path):
    store = tmp_path / "store"
    ingest("cinc2021", synth_cohort, store, workers=0, limit=10, progress=False)
    from ingestion.readers.registry import get_reader

    rels = get_reader("cinc2021").list_records(synth_cohort)[10:14]
    with StoreWriter(store) as w:  # a crash between append and commit, plus a zarr temp file
        w.append(process_batch("cinc2021", str(synth_cohort), rels, 0, w.secret))
        assert w.n_records == 14
    (store / "segments" / "c" / "junk.abc.partial").parent.mkdir(parents=True, exist_ok=True)
    (store / "segments" / "c" / "junk.abc.partial").write_bytes(b"x")
    reader = open_store(store)
    assert reader.n_records == 10 and len(reader.records) == 10
    with StoreWriter(store) as w:
        assert w.n_records == 10 and w.root["records/record_key"].shape == (10,)
        assert w.root["segments"].shape[0] == 20
    assert not (store / "segments" / "c" / "junk.abc.partial").exists()
    ingest("cinc2021", synth_cohort, store, workers=0, progress=False)
    assert_same_store(store, synth_store)


def _faulty_corpus(cohort: Path, out: Path) -> dict:
    """Four good records plus one file per fault kind; returns {rel: expected reason words}."""
    good = sorted(p.with_suffix("") for p in (cohort / "g1").glob("*.hea"))[:4]
    (out / "g1").mkdir(parents=True)
    for base in good:
        for ext in (".hea", ".mat"):
            shutil.copy(base.with_suffix(ext), out / "g1" / (base.name + ext))
    src = good[0]
    faults = {}

    def clone(name):
        shutil.copy(src.with_suffix(".mat"), out / "g1" / f"{name}.mat")
        text = src.with_suffix(".hea").read_text().replace(src.name, name)
        (out / "g1" / f"{name}.hea").write_text(text)
        return out / "g1" / name

    b = clone("X1")  # truncated signal file
    data = b.with_suffix(".mat").read_bytes()
    b.with_suffix(".mat").write_bytes(data[: len(data) // 3])
    faults["g1/X1"] = "X1.mat"
    b = clone("X2")  # missing signal file
    b.with_suffix(".mat").unlink()
    faults["g1/X2"] = "missing"
    b = clone("X3")  # garbage header
    b.with_suffix(".hea").write_text("this is not a header\n")
    faults["g1/X3"] = "header"
    b = clone("X4")  # no ECG lead: every channel renamed to a non-ECG signal
    lines = b.with_suffix(".hea").read_text().splitlines()
    lines[1:13] = [" ".join(line.split()[:-1] + ["pleth"]) for line in lines[1:13]]
    b.with_suffix(".hea").write_text("\n".join(lines) + "\n")
    faults["g1/X4"] = "no ECG lead"
    b = clone("X5")  # shorter than 5 s: header and signal cut to 3 s
    import scipy.io

    val = scipy.io.loadmat(b.with_suffix(".mat"))["val"][:, :1500]
    scipy.io.savemat(b.with_suffix(".mat"), {"val": val}, format="4")
    lines = b.with_suffix(".hea").read_text().splitlines()
    first = lines[0].split()
    lines[0] = " ".join(first[:3] + ["1500"])
    b.with_suffix(".hea").write_text("\n".join(lines) + "\n")
    faults["g1/X5"] = "short"
    return faults


def test_each_fault_kind_is_rejected_and_store_stays_intact(synth_cohort, tmp_path):
    src = tmp_path / "src"
    faults = _faulty_corpus(synth_cohort, src)
    store = tmp_path / "store"
    summary = ingest("cinc2021", src, store, workers=0, batch_size=3, progress=False)
    assert summary["records"] == 4 and sum(summary["rejected"].values()) == len(faults)
    reader = open_store(store)
    rejects = reader.rejects
    assert sorted(rejects["path"]) == sorted(faults)
    for path, word in faults.items():
        reason = rejects.loc[rejects["path"] == path, "reason"].item()
        assert "\n" not in reason and word.lower() in reason.lower(), (path, reason)
    assert (rejects["source"] == "cinc2021").all()
    assert sorted(reader.records["path"]) == sorted(
        p for p in (f"g1/{q.stem}" for q in (src / "g1").glob("S*.hea"))
    )
    for i in range(reader.n_records):  # good records bit-exact despite the faults around them
        import scipy.io

        val = scipy.io.loadmat(src / (reader.records["path"][i] + ".mat"))["val"][:, :5000]
        np.testing.assert_array_equal(
            reader.record_segments_raw(i), val.reshape(12, 2, 2500).transpose(1, 0, 2)
        )
    # re-running skips the rejects too: nothing added, nothing re-read
    again = ingest("cinc2021", src, store, workers=0, progress=False)
    assert again["records"] == 0 and again["skipped"] == 4 + len(faults)
    assert open_store(store).n_rejects == len(faults)


def test_second_writer_is_refused(tmp_path):
    with StoreWriter(tmp_path / "s"), pytest.raises(RuntimeError, match="another process"):
        StoreWriter(tmp_path / "s")


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        StoreWriter(tmp_path / "d")
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"


def test_refuses_foreign_zarr_group(tmp_path):
    zarr.open_group(tmp_path / "z", mode="w").create_array("theirs", shape=(3,), dtype="int8")
    with pytest.raises(ValueError, match="not an ecgplat store"):
        StoreWriter(tmp_path / "z")
    assert not (tmp_path / "z" / "segments").exists()
