"""Hostile input to the readers: headers that lie about their data, impossible rates, unreadable
gains, non-voltage units, paths leading outside SRC, huge records, a lost key, a dying worker."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import wfdb
from hostile_files import LEADS12, edit_header, write_cinc, write_ptbxl, write_wfdb

from ecgplat.store import open_store
from ingestion.conditioning import condition
from ingestion.pipeline import ingest
from ingestion.readers import cinc2021, cpsc2021, ptbxl, wfdb_dir
from ingestion.readers.options import ReadOptions
from ingestion.readers.record import RecordError
from ingestion.worker import process_batch

ROOT = Path(__file__).parents[1]
ECGPLAT = [sys.executable, "-m", "ecgplat"]


def _reason(reader, src, rel, opts=None) -> str:
    with pytest.raises(RecordError) as err:
        condition(reader.read_record(src, rel, opts), opts)
    assert "\n" not in str(err.value)
    return err.value.reason


# ---- 2. data file size against the header -------------------------------------------------

WRITABLE = ["16", "24", "32", "80", "212", "61", "160"]  # wfdb writes the first five


def _write_by_hand(base: Path, fmt: str) -> None:
    """Rewrite a format-16 record's samples as big-endian (61) or offset binary (160)."""
    d = np.fromfile(base.with_suffix(".dat"), "<i2")
    data = d.astype(">i2") if fmt == "61" else (d.astype(np.int32) + 32768).astype("<u2")
    data.tofile(base.with_suffix(".dat"))
    edit_header(base, lambda ls: [ls[0], *(ln.replace(" 16 ", f" {fmt} ", 1) for ln in ls[1:])])


@pytest.mark.parametrize("fmt", WRITABLE)
def test_every_format_reads_like_wfdb_and_a_dropped_signal_line_is_rejected(tmp_path, fmt):
    base = write_wfdb(tmp_path, "r", n_sig=3, fmt=fmt if fmt not in ("61", "160") else "16")
    if fmt in ("61", "160"):
        _write_by_hand(base, fmt)
    rec = wfdb_dir.read_record(tmp_path, "r")
    ref = wfdb.rdrecord(str(base)).p_signal.T
    assert np.allclose(rec.signal, ref, atol=1e-5, equal_nan=True)
    assert np.corrcoef(rec.signal[2], ref[2])[0, 1] > 0.999
    # the header now declares 2 signals over a file that interleaves 3
    edit_header(base, lambda ls: [ls[0].replace("r 3 ", "r 2 ", 1), ls[1], ls[2]])
    assert "header implies" in _reason(wfdb_dir, tmp_path, "r")


@pytest.mark.parametrize("fmt,frame_bytes", [("8", 3), ("310", 4), ("311", 4)])
def test_size_check_of_the_packed_formats(tmp_path, fmt, frame_bytes):
    """3 signals x 3000 samples: 8 bit = 3 bytes per frame, 10 bit packed = 4 bytes."""
    (tmp_path / "p.hea").write_text(
        "p 3 500 3000\n"
        + "".join(f"p.dat {fmt} 100/mV 10 0 0 0 0 {n}\n" for n in ["I", "II", "V1"])
    )
    (tmp_path / "p.dat").write_bytes(bytes(3000 * frame_bytes))
    assert wfdb_dir.read_record(tmp_path, "p").signal.shape == (3, 3000)
    (tmp_path / "p.dat").write_bytes(bytes(3000 * frame_bytes * 4 // 3))  # 4 signals' worth
    assert "header implies" in _reason(wfdb_dir, tmp_path, "p")


def test_eleven_declared_over_twelve_interleaved(tmp_path):
    base = write_wfdb(tmp_path, "r", n_sig=12)
    edit_header(base, lambda ls: [ls[0].replace("r 12 ", "r 11 ", 1), *ls[1:12]])
    reason = _reason(wfdb_dir, tmp_path, "r")
    assert "holds 120000 bytes but the header implies 110000" in reason


def test_extra_bytes_and_multi_file_record(samples_dir, tmp_path):
    for f in ("s0010_re.hea", "s0010_re.dat", "s0010_re.xyz"):
        shutil.copy(samples_dir / "wfdb_misc" / f, tmp_path)
    assert wfdb_dir.read_record(tmp_path, "s0010_re").signal.shape[0] == 15
    with open(
        tmp_path / "s0010_re.xyz", "ab"
    ) as f:  # second file of the record, one frame too long
        f.write(bytes(6))
    assert "data file 2" in _reason(wfdb_dir, tmp_path, "s0010_re")


# ---- 2. sampling rates ----------------------------------------------------------------------

BAD_RATES = {
    "-500": "not a finite positive",
    "0": "not a finite positive",
    "nan": "not a finite positive",
    "inf": "not a finite positive",
    "-inf": "not a finite positive",
    "abc": "not a number",
    "0.25": "outside the supported range 50-10000 Hz",
    "1e9": "outside the supported range 50-10000 Hz",
}


@pytest.mark.parametrize("rate", sorted(BAD_RATES))
def test_bad_sampling_rates_are_rejected_by_both_header_readers(tmp_path, rate):
    base = write_wfdb(tmp_path, "w")
    edit_header(base, lambda ls: [ls[0].replace(" 500 ", f" {rate} ", 1), *ls[1:]])
    assert BAD_RATES[rate] in _reason(wfdb_dir, tmp_path, "w")
    base = write_cinc(tmp_path, "c")
    edit_header(base, lambda ls: [ls[0].replace(" 500 ", f" {rate} ", 1), *ls[1:]])
    assert BAD_RATES[rate] in _reason(cinc2021, tmp_path, "c")


def test_rate_range_is_configurable_and_missing_rate_is_wfdb_default(tmp_path):
    base = write_wfdb(tmp_path, "w", fs=40, seconds=20)
    assert "outside the supported range" in _reason(wfdb_dir, tmp_path, "w")
    rec = wfdb_dir.read_record(tmp_path, "w", ReadOptions(min_fs=20))
    assert rec.fs == 40 and condition(rec, ReadOptions(min_fs=20)).n_segments == 4
    edit_header(base, lambda ls: [" ".join(ls[0].split()[:2]), *ls[1:]])  # no fs, no length
    rec = wfdb_dir.read_record(tmp_path, "w")  # WFDB: 250 Hz; length from the file size
    assert rec.fs == 250 and rec.n_samples == 800


# ---- 2. gains, units, multi-segment, misleading reasons -------------------------------------


def test_one_unreadable_gain_rejects_the_record(tmp_path):
    base = write_wfdb(tmp_path, "w")
    edit_header(base, lambda ls: [ls[0], ls[1], ls[2].replace("1000.0(0)/mV", "abc/mV"), ls[3]])
    assert "signal line 2: gain is not a number" in _reason(wfdb_dir, tmp_path, "w")
    base = write_cinc(tmp_path, "c")
    edit_header(base, lambda ls: [ls[0], ls[1].replace("1000/mV", "x/mV"), *ls[2:]])
    assert "signal line 1: gain is not a number" in _reason(cinc2021, tmp_path, "c")


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda line: line.replace("1000.0(0)/mV", "abc/mV"), "gain is not a number"),
        (lambda line: line.replace("/mV", "/mmHg"), "no channel in voltage units"),
        (lambda line: line.replace("/mV", "/z"), "no channel in voltage units"),
        (lambda line: line.replace("1000.0(0)/mV", "1e999/mV"), "gain is not finite"),
    ],
)
def test_all_leads_bad_names_the_real_cause(tmp_path, edit, words):
    base = write_wfdb(tmp_path, "w")
    edit_header(base, lambda ls: [ls[0], *map(edit, ls[1:])])
    reason = _reason(wfdb_dir, tmp_path, "w")
    assert words in reason and "zero-length" not in reason


def test_multi_segment_header(tmp_path):
    write_wfdb(tmp_path, "seg1")
    (tmp_path / "multi.hea").write_text("multi/2 3 500 10000\nseg1 5000\nseg1 5000\n")
    assert "multi-segment" in _reason(wfdb_dir, tmp_path, "multi")


# ---- 2. unicode file names ------------------------------------------------------------------


def test_unicode_names_in_every_reader(tmp_path):
    write_wfdb(tmp_path / "w", "électro_ß")
    assert wfdb_dir.list_records(tmp_path / "w") == ["électro_ß"]
    assert wfdb_dir.read_record(tmp_path / "w", "électro_ß").signal.shape == (3, 5000)
    write_wfdb(tmp_path / "c" / "élan", "data_7_1", fs=200, n_sig=2, names=["I", "II"])
    rec = cpsc2021.read_record(tmp_path / "c", "élan/data_7_1")
    assert rec.patient_id == "7" and rec.signal.shape == (2, 2000)
    write_ptbxl(tmp_path / "p", [{"filename_hr": "records500/00000/ünï_hr"}])
    assert ptbxl.read_record(tmp_path / "p", "records500/00000/ünï_hr").signal.shape == (12, 5000)
    write_cinc(tmp_path / "k", "Ë01")
    assert cinc2021.read_record(tmp_path / "k", "Ë01").signal.shape == (12, 5000)


# ---- 3. memory bound ------------------------------------------------------------------------


def test_low_rate_header_is_rejected_before_allocating(tmp_path):
    """The 121 KB CinC file whose header says fs=0.25: rejected from the header; the process's
    peak memory stays that of the interpreter (it took 2.2 GB before)."""
    base = write_cinc(tmp_path, "slow", seconds=10)
    edit_header(base, lambda ls: [ls[0].replace(" 500 ", " 0.25 ", 1), *ls[1:]])
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the pre-exec (forked pytest) image
    code = (
        "from ingestion.worker import process_batch; "
        f"b = process_batch('cinc2021', {str(tmp_path)!r}, ['slow'], 0, b'k' * 32); "
        "print(b.rejects[0][2]); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]; "
        "print(int(hwm.split()[1]) // 1024)"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    reason, peak_mb = out.stdout.strip().splitlines()[-2:]
    assert "0.25 Hz is outside the supported range 50-10000 Hz" in reason
    assert int(peak_mb) < 400, peak_mb  # it was 2.2 GB


def test_max_duration_from_the_header(tmp_path):
    write_cinc(tmp_path, "long", seconds=20)
    write_wfdb(tmp_path, "longw", seconds=20)
    opts = ReadOptions(max_seconds=15)
    assert "duration 20 s exceeds the maximum 15 s" in _reason(cinc2021, tmp_path, "long", opts)
    assert "duration 20 s exceeds the maximum 15 s" in _reason(wfdb_dir, tmp_path, "longw", opts)
    # a header claiming 10 hours over a small file: refused from the header, nothing read
    edit_header(tmp_path / "long", lambda ls: [ls[0].replace(" 10000", " 18000000"), *ls[1:]])
    assert "exceeds the maximum 3600 s" in _reason(cinc2021, tmp_path, "long")


def test_cli_max_duration_and_rate_options(tmp_path):
    write_cinc(tmp_path / "src", "A1", seconds=20)
    write_cinc(tmp_path / "src", "A2", seconds=10)
    store = tmp_path / "store"
    args = ["ingest", "cinc2021", str(tmp_path / "src"), "--store", str(store), "--workers", "0"]
    out = subprocess.run(
        [*ECGPLAT, *args, "--max-duration", "15", "--no-progress", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["records"] == 1
    rejects = open_store(store).rejects
    assert rejects["reason"].tolist() == ["duration 20 s exceeds the maximum 15 s (--max-duration)"]
    for bad in (["--allow-outside"], ["--min-fs", "20000"]):
        out = subprocess.run(
            [*ECGPLAT, *args, *bad],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and bad[0] in out.stderr


def _cohort(tmp_path, n=10) -> Path:
    src = tmp_path / "src"
    for i in range(n):
        write_cinc(src / "g1", f"R{i:02d}", patient=f"P{i // 2}")
    return src


@pytest.mark.parametrize("cluster", ["memory-limited", "default"])
def test_worker_death_costs_only_that_record(tmp_path, monkeypatch, cluster):
    """The named record makes its worker process exit (on a LocalCluster with a 1 GiB memory
    limit per worker, and on the pipeline's own LocalCluster). The batch is retried record by
    record: 9 stored, the culprit rejected as "worker died"."""
    import dask
    from distributed import LocalCluster

    src = _cohort(tmp_path)
    monkeypatch.setenv("ECGPLAT_TEST_CRASH_ON", "g1/R03")
    kwargs = {"batch_size": 4, "progress": False}
    if cluster == "default":
        summary = ingest("cinc2021", src, tmp_path / "s", workers=2, **kwargs)
    else:
        with (
            dask.config.set({"distributed.scheduler.allowed-failures": 0}),
            LocalCluster(
                n_workers=2, threads_per_worker=1, memory_limit="1GiB", dashboard_address=":0"
            ) as lc,
        ):
            summary = ingest(
                "cinc2021", src, tmp_path / "s", scheduler=lc.scheduler_address, **kwargs
            )
    assert summary["records"] == 9 and summary["rejected"] == {"worker died": 1}, summary
    store = open_store(tmp_path / "s")
    assert store.rejects["path"].tolist() == ["g1/R03"]
    assert sorted(store.records["path"]) == [f"g1/R{i:02d}" for i in range(10) if i != 3]
    # in process, the hook never kills the driver
    batch = process_batch("cinc2021", str(src), ["g1/R03"], 0, b"k" * 32)
    assert batch.n_records == 1


def test_a_record_that_really_blows_the_worker_memory_limit(tmp_path):
    """With the rate bound switched off (min 0.01 Hz), the fs=0.25 record makes resampling take
    gigabytes: the nanny of a 700 MiB worker kills it, twice; the batch is retried record by
    record and only the culprit is lost, as "worker died"."""
    import dask
    from distributed import LocalCluster

    src = tmp_path / "src"
    for i in range(6):
        write_cinc(src / "g1", f"R{i:02d}")
    edit_header(src / "g1" / "R02", lambda ls: [ls[0].replace(" 500 ", " 0.25 ", 1), *ls[1:]])
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        LocalCluster(
            n_workers=1, threads_per_worker=1, memory_limit="700MiB", dashboard_address=":0"
        ) as lc,
    ):
        summary = ingest(
            "cinc2021", src, tmp_path / "s", scheduler=lc.scheduler_address, batch_size=3,
            progress=False, opts=ReadOptions(min_fs=0.01, max_seconds=1e9),
        )  # fmt: skip
    assert summary["records"] == 5 and summary["rejected"] == {"worker died": 1}, summary
    assert open_store(tmp_path / "s").rejects["path"].tolist() == ["g1/R02"]


# ---- 4. paths outside SRC -------------------------------------------------------------------


def _outside(tmp_path) -> tuple[Path, Path]:
    src, out = tmp_path / "corpus" / "a" / "b", tmp_path / "outside"
    write_cinc(out, "secret")
    write_wfdb(out, "secretw")
    src.mkdir(parents=True)
    return src, out


@pytest.mark.parametrize("target", ["../../../outside/secret.mat", "ABS"])
def test_cinc_header_pointing_outside(tmp_path, target):
    src, out = _outside(tmp_path)
    target = str(out / "secret.mat") if target == "ABS" else target
    write_cinc(src, "X", mat=target)
    assert "refused" in _reason(cinc2021, src, "X")


def test_wfdb_header_pointing_outside(tmp_path):
    src, out = _outside(tmp_path)
    base = write_wfdb(src, "w")
    edit_header(
        base,
        lambda ls: [ls[0], *(ln.replace("w.dat", "../../../outside/secretw.dat") for ln in ls[1:])],
    )
    assert "outside SRC" in _reason(wfdb_dir, src, "w")
    edit_header(
        base,
        lambda ls: [
            ls[0],
            *(
                ln.replace("../../../outside/secretw.dat", str(out / "secretw.dat"))
                for ln in ls[1:]
            ),
        ],
    )
    assert "absolute" in _reason(wfdb_dir, src, "w")


def test_symlinks_need_follow_and_stay_inside_unless_allow_outside(tmp_path):
    src, out = _outside(tmp_path)
    write_cinc(src, "L")
    (src / "L.mat").unlink()
    (src / "L.mat").symlink_to(out / "secret.mat")
    base = write_wfdb(src, "W")
    (src / "W.dat").unlink()
    (src / "W.dat").symlink_to(out / "secretw.dat")
    write_cinc(src / "real", "IN")
    (src / "IN.hea").symlink_to(src / "real" / "IN.hea")
    (src / "IN.mat").symlink_to(src / "real" / "IN.mat")
    follow = ReadOptions(follow_symlinks=True)
    anywhere = ReadOptions(follow_symlinks=True, allow_outside=True)
    assert "--follow-symlinks" in _reason(cinc2021, src, "L")
    assert "--follow-symlinks" in _reason(wfdb_dir, src, "W")
    assert "--follow-symlinks" in _reason(cinc2021, src, "IN")
    assert "--allow-outside" in _reason(cinc2021, src, "L", follow)
    assert "--allow-outside" in _reason(wfdb_dir, src, "W", follow)
    assert cinc2021.read_record(src, "IN", follow).signal.shape == (12, 5000)
    assert cinc2021.read_record(src, "L", anywhere).signal.shape == (12, 5000)
    assert wfdb_dir.read_record(src, "W", anywhere).signal.shape == (3, 5000)
    assert base.with_suffix(".hea").exists()
    with pytest.raises(ValueError, match="follow-symlinks"):
        ReadOptions(allow_outside=True)


def test_ptbxl_rows_pointing_outside(tmp_path):
    write_wfdb(tmp_path / "outside", "x", n_sig=12)
    rows = [
        {"filename_hr": "records500/00000/00001_hr"},
        {"filename_hr": "../outside/x", "_no_file": True},
        {"filename_hr": str(tmp_path / "outside" / "x"), "_no_file": True},
    ]
    write_ptbxl(tmp_path / "root", rows)
    src = tmp_path / "root"
    assert ptbxl.read_record(src, "records500/00000/00001_hr").signal.shape == (12, 5000)
    assert "outside SRC" in _reason(ptbxl, src, "../outside/x")
    assert "absolute" in _reason(ptbxl, src, str(tmp_path / "outside" / "x"))
    summary = ingest("ptbxl", src, tmp_path / "s", workers=0, progress=False)
    assert summary["records"] == 1 and sum(summary["rejected"].values()) == 2


# ---- 2. the lost key ------------------------------------------------------------------------


def test_lost_secret_key_refuses_to_write(tmp_path):
    src = _cohort(tmp_path, n=6)
    store = tmp_path / "s"
    ingest("cinc2021", src, store, workers=0, progress=False)
    before = open_store(store).records.copy()
    key = (store / "secret.key").read_bytes()
    (store / "secret.key").unlink()
    with pytest.raises(ValueError, match="restore secret.key from your backup"):
        ingest("cinc2021", src, store, workers=0, progress=False)
    out = subprocess.run(
        [*ECGPLAT, "ingest", "cinc2021", str(src), "--store", str(store), "--workers", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "backup" in out.stderr
    assert not (store / "secret.key").exists()
    (store / "secret.key").write_bytes(key)  # restored: the re-run adds nothing
    summary = ingest("cinc2021", src, store, workers=0, progress=False)
    assert summary["records"] == 0 and summary["skipped"] == 6
    after = open_store(store).records
    assert after.equals(before) and after["patient_key"].nunique() == 3


def test_condition_bounds_a_raw_record_from_any_reader():
    from ingestion.readers.record import RawRecord

    rec = RawRecord("x", "r", "r", np.zeros((12, 600), np.float32), 0.05, LEADS12)
    with pytest.raises(RecordError, match="outside the supported range"):
        condition(rec)


# ---- neighbours of the cases above ------------------------------------------------------------


def test_ptbxl_metadata_faults_name_the_column(tmp_path):
    rows = [
        {"filename_hr": "records500/00000/00001_hr", "ecg_id": "x"},
        {"filename_hr": "records500/00000/00002_hr", "patient_id": 17.0},
        {"filename_hr": "records500/00000/00002_hr", "_no_file": True},  # listed twice
        {"filename_hr": "records500/00000/00003_hr", "scp_codes": "[" * 500},
    ]
    write_ptbxl(tmp_path, rows)
    assert "ecg_id in ptbxl_database.csv is not an integer" in _reason(
        ptbxl, tmp_path, "records500/00000/00001_hr"
    )
    assert "listed more than once" in _reason(ptbxl, tmp_path, "records500/00000/00002_hr")
    assert "unparsable scp_codes" in _reason(ptbxl, tmp_path, "records500/00000/00003_hr")


def test_an_empty_mat_file_is_named_empty(tmp_path):
    """It said "has no 'val' matrix" (the matrix loop never ran)."""
    base = write_cinc(tmp_path, "e")
    base.with_suffix(".mat").write_bytes(b"")
    reason = _reason(cinc2021, tmp_path, "e")
    assert reason == "cannot read e.mat (truncated or not MATLAB v4): e.mat is empty"


def test_oversized_files_are_refused_before_reading(tmp_path):
    base = write_cinc(tmp_path, "big")
    with open(base.with_suffix(".mat"), "ab") as f:  # 1 MB appended after the 'val' matrix
        f.write(bytes(1 << 20))
    assert "larger than the header" in _reason(cinc2021, tmp_path, "big")
    base = write_wfdb(tmp_path, "hea")
    with open(base.with_suffix(".hea"), "a") as f:
        f.write("#" + "x" * (2 << 20) + "\n")
    assert "header file larger than" in _reason(wfdb_dir, tmp_path, "hea")


def test_more_gain_and_header_spellings(tmp_path):
    base = write_wfdb(tmp_path, "w")
    text = base.with_suffix(".hea").read_text()
    for bad, words in [
        ("nan/mV", "gain is not a number"),
        ("1000.0(x)/mV", "gain is not a number"),
        ("1000.0(0)/mV 16 zero", "non-integer ADC field"),
    ]:
        edit_header(base, lambda ls, bad=bad: [ls[0], ls[1].replace("1000.0(0)/mV", bad), *ls[2:]])
        assert words in _reason(wfdb_dir, tmp_path, "w"), bad
        base.with_suffix(".hea").write_text(text)
    edit_header(base, lambda ls: [ls[0].replace("w 3 ", "w 0 "), *ls[1:]])
    assert "declares no signals" in _reason(wfdb_dir, tmp_path, "w")
    edit_header(base, lambda ls: [ls[0].replace("w 0 ", "w 900000000 "), *ls[1:]])
    assert "declares 900000000 signals but lists 3" in _reason(wfdb_dir, tmp_path, "w")
