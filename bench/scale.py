"""Scale benchmark: every stage of the pipeline on a corpus shaped like PhysioNet/CinC 2021, and
the interactive operations on a store of a million records.

Pipeline mode (default). Writes ``--records`` synthetic records in the CinC 2021 on-disk format
(``.hea`` + MATLAB v4 ``.mat``): lengths uniform in 6-60 s; rates 257 / 500 / 1,000 Hz (weights
0.2 / 0.6 / 0.2); about 20 % of the records with fewer leads (2, 3, 4 or 6 of the 12); about
1 % corrupted files (truncated ``.mat``, unreadable sampling rate, missing ``.mat``); two records
per patient (a ``#Patient:`` comment) so that identification has a gallery and a probe. Then it
runs each stage as its own process, as a user would, and reports for each the wall time, the
CPU seconds and the peak RSS of the process tree (psutil, sampled every 50 ms) and the disk space
it added: ``ecgplat ingest cinc2021`` (Dask, default LocalCluster), ``ecgplat split --ident``,
``ecgplat shards`` (train split), the streaming loader (``training.data``: time to the first
batch and batches/s over ``--loader-batches``), ``ecgplat embed`` (``tiny``: the committed
pretrained fixture), ``ecgplat index build`` (gallery) and ``ecgplat evaluate identify``.
Several ``--records`` values give per-record time and RSS growth ratios between the smallest
and the largest size.

``--million N`` instead writes an N-record store directly through ``StoreWriter`` (synthetic
rows, one segment per record, drawn from a small pool of encoded segments) and times, each in a
fresh process: open + ``info``, ``select`` by split, ``record_segments`` of one record, the
first batch of the store-backed loader and a FAISS query over N vectors. ``--million 0`` only
times the writer on 100,000 records (the extrapolation point).

Everything is written under ``--workdir`` (default: a temporary directory) and the JSON goes to
stdout and ``--out``.

    python bench/scale.py --records 2000 10000 --workdir scale-work --out scale.json
    python bench/scale.py --million 1000000 --workdir scale-work --out million.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# the repository root first: bench/retrieval.py would otherwise shadow the retrieval package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.common import REPO, TreeSampler, dir_bytes, workdir, write_json, write_report  # noqa: E402
from bench.hardware import lscpu  # noqa: E402

CHECKPOINT = REPO / "tests" / "fixtures" / "pretrained_tiny" / "w2v_cmsc_rlm_tiny_synth.pt"
RATES, RATE_WEIGHTS = (257, 500, 1000), (0.2, 0.6, 0.2)
REDUCED_LEADS = (
    ("I", "II"),
    ("I", "II", "V2"),
    ("I", "II", "III", "V2"),
    ("I", "II", "III", "aVR", "aVL", "aVF"),
)
REDUCED_FRACTION, CORRUPT_FRACTION = 0.2, 0.01
CORRUPTIONS = ("truncated .mat", "bad sampling rate", "missing .mat")
TARGETS = {
    "time_per_record_growth": 1.3,
    "rss_growth": 1.2,
    "open_info_s": 2.0,
    "select_s": 1.0,
    "one_record_ms": 20.0,
    "first_batch_s": 5.0,
}


# ---- measurement -----------------------------------------------------------------------------
def run_stage(name: str, cmd: list[str], disk: list[Path], log: Path) -> dict:
    """Run one stage as a subprocess; wall and CPU seconds, peak RSS, disk added.

    The peak RSS is the larger of the process tree's sampled peak (50 ms samples: a worker
    tree's sum) and the stage process's own high-water mark (`VmHWM`, which holds a peak
    between samples; its last 50 ms can still escape it)."""
    before = sum(dir_bytes(p) for p in disk)
    env = dict(os.environ, PYTHONPATH=str(REPO), ECGPLAT_DEBUG="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with TreeSampler(proc.pid) as sampler:
        out, err = proc.communicate()
        seconds = time.perf_counter() - t0
    with log.open("a") as f:
        f.write(f"== {name}: {' '.join(cmd)}\n{out[-4000:]}\n{err[-4000:]}\n")
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["(no stderr)"])[-1]
        raise RuntimeError(f"stage {name} exited {proc.returncode}: {last}")
    own_peak = sampler.hwm
    result = {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(sampler.cpu_seconds, 2),
        "peak_rss_mb": round(max(sampler.peak, own_peak) / 2**20, 1),
        "sampled_tree_peak_rss_mb": round(sampler.peak / 2**20, 1),
        "process_peak_rss_mb": round(own_peak / 2**20, 1),
        "disk_mb": round((sum(dir_bytes(p) for p in disk) - before) / 1e6, 1),
    }
    with contextlib.suppress(ValueError):  # no JSON printed, or not JSON
        start = out.index("{")
        result["output"] = json.loads(out[start:])
    return result


def cpu_flags() -> dict:
    """lscpu's model name, core count and flags (the machine the numbers come from)."""
    fields = lscpu()
    if not fields:
        return {"lscpu": "unavailable"}
    return {
        "model_name": fields.get("Model name"),
        "cpus": fields.get("CPU(s)"),
        "flags": fields.get("Flags", ""),
    }


# ---- the PhysioNet-2021-shaped corpus ----------------------------------------------------------
def _corrupt(base: Path, kind: str) -> None:
    mat, hea = base.with_suffix(".mat"), base.with_suffix(".hea")
    if kind == "truncated .mat":
        data = mat.read_bytes()
        mat.write_bytes(data[: len(data) // 2])
    elif kind == "bad sampling rate":
        lines = hea.read_text().splitlines()
        first = lines[0].split()
        first[2] = "fast"
        hea.write_text("\n".join([" ".join(first), *lines[1:]]) + "\n")
    else:
        mat.unlink()


def _write_records(args: tuple[Path, int, int, int]) -> dict:
    """Records ``lo..hi-1`` of the corpus (one worker's share); counts of what was written."""
    import numpy as np

    from ecgplat.leads import LEADS
    from ingestion.synth import (
        ABNORMALITIES,
        GAIN,
        NORMAL_CODES,
        make_patient,
        synth_record,
        write_record,
    )

    out, lo, hi, seed = args
    kinds = list(ABNORMALITIES)
    counts = {"reduced_leads": 0, "corrupted": 0, "seconds": 0.0}
    for idx in range(lo, hi):
        rng = np.random.default_rng([seed, idx])
        p = idx // 2
        patient = make_patient(np.random.default_rng([seed, 1_000_000_000 + p]))
        kind = kinds[int(rng.integers(len(kinds)))] if rng.random() < 0.5 else None
        fs = int(rng.choice(RATES, p=RATE_WEIGHTS))
        seconds = round(float(rng.uniform(6.0, 60.0)), 3)
        x, _ = synth_record(patient, rng, kind, seconds=seconds, fs=fs)
        leads = LEADS
        if rng.random() < REDUCED_FRACTION:
            leads = REDUCED_LEADS[int(rng.integers(len(REDUCED_LEADS)))]
            x = x[[LEADS.index(name) for name in leads]]
            counts["reduced_leads"] += 1
        val = np.clip(np.rint(x * GAIN), -32768, 32767).astype(np.int16)
        folder = out / f"g{idx // 1000 + 1}"
        folder.mkdir(exist_ok=True)
        base = folder / f"S{idx + 1:06d}"
        codes = ABNORMALITIES[kind] if kind else NORMAL_CODES
        write_record(base, val, fs, patient["age"], patient["sex"], codes, f"SYN{p + 1:06d}", leads)
        if rng.random() < CORRUPT_FRACTION:
            _corrupt(base, CORRUPTIONS[idx % len(CORRUPTIONS)])
            counts["corrupted"] += 1
        counts["seconds"] += seconds
    return counts


def write_corpus(root: Path, records: int, seed: int = 0, workers: int = 2) -> tuple[Path, dict]:
    """The corpus of ``records`` records under ``root`` (reused when already complete)."""
    from multiprocessing import get_context

    out = root / f"corpus-{records}"
    done = out / "corpus.json"
    if done.exists():
        return out, json.loads(done.read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    step = 250
    parts = [(out, lo, min(records, lo + step), seed) for lo in range(0, records, step)]
    with get_context("spawn").Pool(workers) as pool:
        results = pool.map(_write_records, parts, chunksize=1)
    info = {
        "records": records,
        "reduced_leads": sum(r["reduced_leads"] for r in results),
        "corrupted": sum(r["corrupted"] for r in results),
        "mean_seconds": round(sum(r["seconds"] for r in results) / records, 2),
        "write_seconds": round(time.perf_counter() - t0, 1),
        "disk_mb": round(dir_bytes(out) / 1e6, 1),
    }
    done.write_text(json.dumps(info))
    return out, info


# ---- pipeline mode ---------------------------------------------------------------------------
def loader_main(shards: Path, batches: int, batch_size: int) -> None:
    """Subprocess of the `loader` stage: first batch and throughput of the training stream."""
    t0 = time.perf_counter()
    from training.data import BatchStream, StreamSpec, shard_set

    spec = StreamSpec(shards=shard_set(shards, "train"), mode="pairs", batch_size=batch_size)
    it = iter(BatchStream(spec, num_workers=0))
    next(it)
    first = time.perf_counter() - t0
    t1, segments, n = time.perf_counter(), 0, 0
    for batch in it:
        segments += int(batch["source"].shape[0])
        n += 1
        if n == batches:
            break
    rate = time.perf_counter() - t1
    print(
        json.dumps(
            {
                "first_batch_s": round(first, 3),
                "batches": n,
                "batches_per_s": round(n / rate, 2),
                "segments_per_s": round(segments / rate, 1),
            }
        )
    )


def run_pipeline(
    root: Path,
    records: int,
    loader_batches: int,
    log: Path,
    only: tuple[str, ...] | None = None,
    drop_corpus: bool = False,
) -> dict:
    """Every stage (or those in ``only``) on the ``records`` corpus. Stage results are kept in
    ``run-<records>/stages.json``; a run restricted to later stages reuses the run's store and
    adds to that file, so a long run can be finished in several invocations."""
    work = root / f"run-{records}"
    saved = work / "stages.json"
    if only is None or "ingest" in only:
        src, corpus = write_corpus(root, records)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
    elif not saved.exists():
        raise SystemExit(f"{work}: no earlier run to continue (run the ingest stage first)")
    else:  # continuing: the corpus may have been dropped after ingest
        src, corpus = root / f"corpus-{records}", json.loads(saved.read_text())["corpus"]
    store, shards, index = work / "store.zarr", work / "shards", work / "gallery"
    ecg = [sys.executable, "-m", "ecgplat"]
    stages = {
        "ingest": (
            [*ecg, "ingest", "cinc2021", str(src), "--store", str(store), "--no-progress"],
            [store],
        ),
        "split": ([*ecg, "split", str(store), "--ident"], [store]),
        "shards": (
            [*ecg, "shards", str(store), "--split", "train", "--out", str(shards)],
            [shards],
        ),
        "loader": (
            [sys.executable, __file__, "loader", str(shards), str(loader_batches)],
            [],
        ),
        "embed": (
            [*ecg, "embed", "--checkpoint", str(CHECKPOINT), "--store", str(store)]
            + ["--name", "scale", "--device", "cpu", "--precision", "fp32"],
            [store],
        ),
        "index_build": (
            [*ecg, "index", "build", "--store", str(store), "--features", "scale"]
            + ["--split", "gallery", "--out", str(index)],
            [work],
        ),
        "evaluate_identify": (
            [*ecg, "evaluate", "identify", "--store", str(store), "--features", "scale", "--json"],
            [],
        ),
    }
    out = {"records": records, "corpus": corpus, "stages": {}}
    if saved.exists():
        out = json.loads(saved.read_text())
    for name, (cmd, disk) in stages.items():
        if only is not None and name not in only:
            continue
        print(f"[scale] {records}: {name}", file=sys.stderr, flush=True)
        out["stages"][name] = run_stage(name, cmd, disk, log)
        out["stages"][name]["load_average_1min"] = round(os.getloadavg()[0], 2)
        if name == "ingest" and drop_corpus:  # the corpus is only read by ingest
            shutil.rmtree(src, ignore_errors=True)
            out["corpus"]["dropped_after_ingest"] = True
        saved.write_text(json.dumps(out, indent=1))
    from ecgplat.store import open_store

    st = open_store(store)
    out["stored"] = {"records": st.n_records, "segments": st.n_segments, "rejects": st.n_rejects}
    for stage in out["stages"].values():
        stage["ms_per_record"] = round(stage["seconds"] * 1e3 / records, 3)
        stage["cpu_ms_per_record"] = round(stage["cpu_seconds"] * 1e3 / records, 3)
    return out


def growth(runs: list[dict]) -> dict:
    """Per-record time (wall and CPU) and peak RSS ratios, largest run over smallest."""
    small, large = runs[0], runs[-1]
    out = {"sizes": [small["records"], large["records"]]}
    for name, a in small["stages"].items():
        b = large["stages"].get(name)
        if b is None:
            continue
        ratio = {
            "wall_per_record": round(b["ms_per_record"] / max(a["ms_per_record"], 1e-9), 3),
            "cpu_per_record": round(b["cpu_ms_per_record"] / max(a["cpu_ms_per_record"], 1e-9), 3),
            "peak_rss": round(b["peak_rss_mb"] / max(a["peak_rss_mb"], 1e-9), 3),
        }
        ratio["meets_time_target"] = ratio["cpu_per_record"] <= TARGETS["time_per_record_growth"]
        ratio["meets_rss_target"] = ratio["peak_rss"] <= TARGETS["rss_growth"]
        out[name] = ratio
    return out


# ---- million mode ----------------------------------------------------------------------------
def _segment_pool(n: int = 8) -> list[bytes]:
    """Encoded 5 s segments of a few noiseless synthetic records (the rows of the big store
    share them; white noise would make each 29 KB, 29 GB for a million)."""
    import numpy as np

    from ecgplat.store.segment_codec import encode_segments
    from ingestion.synth import GAIN, make_patient, synth_record

    chunks = []
    for k in range(n):
        rng = np.random.default_rng([7, k])
        patient = dict(make_patient(rng), noise_mv=0.0)  # smooth: the pool compresses like ECGs
        x, _ = synth_record(patient, rng, None, seconds=5.0, fs=500)
        val = np.clip(np.rint(x * GAIN), -32768, 32767).astype(np.int16)
        chunks += encode_segments(val[None])
    return chunks


def _synthetic_batch(seq: int, lo: int, hi: int, pool: list[bytes], secret: bytes):
    import numpy as np

    from ecgplat import store as S
    from ecgplat.privacy import pseudonymise
    from ecgplat.store.writer import RecordBatch, path_hash

    idx = np.arange(lo, hi)
    n = len(idx)
    rel = [f"g{i // 1000 + 1}/R{i + 1:07d}" for i in idx]
    rng = np.random.default_rng([11, seq])
    labels = np.zeros((n, 26), dtype=bool)
    labels[np.arange(n), rng.integers(0, 26, n)] = True
    cols = {
        "record_key": np.array([f"synth/R{i + 1:07d}" for i in idx], dtype=object),
        "source": np.full(n, "synth", dtype=object),
        "record_id": np.array([f"R{i + 1:07d}" for i in idx], dtype=object),
        "path": np.array(rel, dtype=object),
        "path_hash": np.array([path_hash("synth", r, secret) for r in rel], dtype=object),
        "patient_key": np.array([pseudonymise(f"P{i // 2}", secret) for i in idx], dtype=object),
        "fs_original": np.full(n, 500.0),
        "n_samples_original": np.full(n, S.SEGMENT_SAMPLES, dtype=np.int64),
        "age": rng.integers(18, 90, n).astype(np.float32),
        "sex": np.where(rng.random(n) < 0.5, "Male", "Female").astype(object),
        "raw_codes": np.full(n, "426783006", dtype=object),
        "labels": labels,
        "lead_mask": np.ones((n, S.N_LEADS), dtype=bool),
        "strat_fold": np.full(n, -1, dtype=np.int16),
        "seg_count": np.ones(n, dtype=np.int32),
        "units": np.full(n, "uV", dtype=object),
    }
    chunks = [pool[i % len(pool)] for i in idx]
    return RecordBatch(seq, chunks, cols)


def write_million(path: Path, records: int, batch: int = 20_000) -> dict:
    """An N-record store written through StoreWriter, with a split and an ident split."""
    import numpy as np

    from ecgplat.store.writer import StoreWriter

    shutil.rmtree(path, ignore_errors=True)
    pool = _segment_pool()
    t0 = time.perf_counter()
    keys: set[str] = set()
    with StoreWriter(path) as writer:
        secret = writer.secret
        for seq, lo in enumerate(range(0, records, batch)):
            writer.append(_synthetic_batch(seq, lo, min(records, lo + batch), pool, secret), keys)
            writer.commit()
        t_rows = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        patient = np.arange(records) // 2
        draw = rng.random(patient.max() + 1)[patient]
        split = np.where(draw < 0.8, "train", np.where(draw < 0.9, "valid", "test"))
        ident = np.where(np.arange(records) % 2 == 0, "gallery", "probe")
        writer.write_splits(split, ident)
    return {
        "records": records,
        "write_seconds": round(time.perf_counter() - t0, 1),
        "rows_seconds": round(t_rows, 1),
        "disk_mb": round(dir_bytes(path) / 1e6, 1),
    }


def _timed(out: dict, name: str, fn):
    """Run ``fn()``; record its wall seconds as ``name`` and CPU seconds as ``name``_cpu."""
    t, c = time.perf_counter(), time.process_time()
    value = fn()
    out[name], out[f"{name}_cpu"] = time.perf_counter() - t, time.process_time() - c
    return value


def interactive_main(store_path: Path, dim: int) -> None:
    """Subprocess: the interactive operations on a big store, each from a fresh view (imports
    done first and timed apart: they are paid once per process, whatever the store size)."""
    out: dict = {}

    def imports():
        import numpy  # noqa: F401
        import pandas  # noqa: F401
        import zarr  # noqa: F401

        import ecgplat.store  # noqa: F401

    _timed(out, "imports_s", imports)
    import numpy as np

    from ecgplat.store import open_store

    store = _timed(out, "open_s", lambda: open_store(store_path))
    _timed(out, "info_s", store.summary)
    out["open_info_s"] = out["open_s"] + out["info_s"]
    out["open_info_s_cpu"] = out["open_s_cpu"] + out["info_s_cpu"]

    store = open_store(store_path)
    train = _timed(out, "select_cold_s", lambda: store.select(split="train"))
    _timed(out, "select_warm_s", lambda: store.select(split="valid"))

    picks = np.random.default_rng(0).integers(0, store.n_records, 51)
    fresh = open_store(store_path)
    _timed(out, "one_record_cold_s", lambda: fresh.record_segments(int(picks[0])))
    times = []
    for i in picks[1:]:
        t = time.perf_counter()
        fresh.record_segments(int(i))
        times.append(time.perf_counter() - t)
    out["one_record_cold_ms"] = out.pop("one_record_cold_s") * 1e3
    out["one_record_cold_ms_cpu"] = out.pop("one_record_cold_s_cpu") * 1e3
    out["one_record_warm_median_ms"] = float(np.median(times) * 1e3)

    from training.batch import store_batches

    def first_batch():
        view = open_store(store_path)
        return next(iter(store_batches(view, view.select(split="train"), batch_size=64)))

    _timed(out, "first_store_batch_s", first_batch)
    out["train_records"] = int(len(train))
    out.update(index_latency(store.n_records, dim))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


def index_latency(n: int, dim: int, queries: int = 50) -> dict:
    """Build an exact FAISS index over n random unit vectors; single-query latency."""
    import numpy as np

    from retrieval.index import build_index

    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t = time.perf_counter()
    index = build_index(x, [f"r{i}" for i in range(n)], kind="flat", copy=False)
    build = time.perf_counter() - t
    times = []
    for q in x[rng.integers(0, n, queries)]:
        t = time.perf_counter()
        index.search(q[None], 10)
        times.append(time.perf_counter() - t)
    return {
        "index_vectors": n,
        "index_dim": dim,
        "index_build_s": build,
        "query_median_ms": float(np.median(times) * 1e3),
    }


def run_million(root: Path, records: int, dim: int, log: Path) -> dict:
    out = {}
    if records == 0:  # the extrapolation point only
        probe = write_million(root / "million-100000", 100_000)
        out["writer_100k"] = probe
        out["writer_1M_estimate_s"] = round(probe["write_seconds"] * 10, 1)
        return out
    path = root / f"million-{records}"
    out["writer"] = write_million(path, records)
    out["interactive"] = run_stage(
        "interactive", [sys.executable, __file__, "interactive", str(path), str(dim)], [], log
    )
    out["info_cli"] = run_stage(
        "info_cli", [sys.executable, "-m", "ecgplat", "info", str(path), "--json"], [], log
    )
    info = out["info_cli"].get("output", {})
    if "path" in info:  # the store by its name under the work directory, not this machine's path
        info["path"] = path.name
    res = out["interactive"].get("output", {})
    # wall and CPU verdicts: on a loaded shared machine wall time is mostly waiting for a core
    for kind, suffix in (("wall", ""), ("cpu", "_cpu")):
        out[f"targets_{kind}"] = {
            "open+info<=2s": res.get(f"open_info_s{suffix}", 1e9) <= TARGETS["open_info_s"],
            "select<=1s": res.get(f"select_cold_s{suffix}", 1e9) <= TARGETS["select_s"],
            "one_record<=20ms": res.get(f"one_record_cold_ms{suffix}", 1e9)
            <= TARGETS["one_record_ms"],
            "first_batch<=5s": res.get(f"first_store_batch_s{suffix}", 1e9)
            <= TARGETS["first_batch_s"],
        }
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "loader":
        loader_main(Path(sys.argv[2]), int(sys.argv[3]), 16)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "interactive":
        interactive_main(Path(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--loader-batches", type=int, default=50)
    parser.add_argument("--million", type=int, default=None, metavar="N")
    parser.add_argument("--dim", type=int, default=64, help="vector size of the index query")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the stores of pipeline runs")
    parser.add_argument(
        "--stages",
        default=None,
        help="comma list of stages to run (default all); without ingest, continues a kept run",
    )
    parser.add_argument(
        "--drop-corpus",
        action="store_true",
        help="delete each corpus once ingested (the largest runs need the disk)",
    )
    args = parser.parse_args()
    with workdir(args.workdir, "ecgplat-scale-") as root:
        log = root / "stages.log"
        result = {"cpu": cpu_flags(), "cpu_count": os.cpu_count(), "targets": TARGETS}
        if args.million is not None:
            result["million"] = run_million(root, args.million, args.dim, log)
        else:
            runs = []
            for n in sorted(args.records):
                only = tuple(args.stages.split(",")) if args.stages else None
                runs.append(run_pipeline(root, n, args.loader_batches, log, only, args.drop_corpus))
                if not args.keep:
                    shutil.rmtree(root / f"run-{n}", ignore_errors=True)
                result["runs"] = runs
                if args.out:  # what is done so far, should a later size fail
                    write_json(args.out, result, indent=1)
            if len(runs) > 1:
                result["growth"] = growth(runs)
        result["load_average_1min"] = round(os.getloadavg()[0], 2)
        write_report(result, args.out, indent=1)


if __name__ == "__main__":
    main()
