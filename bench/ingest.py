"""Ingest benchmark on real formats: the pipeline in process and with 1 and 2 Dask workers,
each against a bare reader loop over the same files, timed in the same run.

The floor is what a reader library alone costs: ``wfdb.rdrecord`` on each WFDB record (or
``scipy.io.loadmat`` on each MATLAB ``.mat`` of the CinC 2021 format). Corpora measured: the
bundled samples under ``data/samples`` (PTB-XL, CinC 2021, generic WFDB), plus, when ``--data
DIR`` names a folder of real corpora, each of its ``ptbxl/``, ``cinc2021/``, ``ludb/``,
``code15/`` and ``ptbxl_preprocessed/`` (read with ``--units z``) that exists; every corpus is
copied into a temporary directory first. The scale run replicates the PTB-XL records (from
``--data`` when given, else the bundled ones) under new record names and ecg ids until there
are ``--records`` of them (hard links for the ``.dat`` files, rewritten headers and csv rows),
and ingests them in process, with 1 and with 2 Dask workers (rates without the cluster start).
Prints one JSON object with records/s, ratios to the bare loop, the targets and the CPU flags.

``--synthetic`` runs the older benchmark on a synthetic CinC-2021-format cohort (against the
original's naive loadmat + savemat loop); ``--rss-check`` compares peak RSS for ``--records``
and 10x as many synthetic records (2 workers).

    python bench/ingest.py [--data DIR] [--records 2000] [--workdir DIR]
    python bench/ingest.py --synthetic [--records 2000] | --rss-check
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
# the repository root first: bench/retrieval.py would otherwise shadow the retrieval package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, TreeSampler, dir_bytes, workdir, write_report  # noqa: E402
from bench.hardware import lscpu, simd_flags  # noqa: E402


def make_cohort(root: Path, records: int) -> Path:
    from ingestion.synth import write_cohort

    out = root / f"cohort-{records}"
    if not (out / "synth_manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        per_patient = 10
        write_cohort(out, max(1, records // per_patient), per_patient, seconds=10, seed=0)
    return out


def run_pipeline(src: Path, store: Path, workers: int, batch_size: int) -> dict:
    from ingestion.pipeline import ingest

    shutil.rmtree(store, ignore_errors=True)
    with TreeSampler() as rss:
        summary = ingest(
            "cinc2021", src, store, workers=workers, batch_size=batch_size, progress=False
        )
    work = summary["seconds"] - summary["startup_seconds"]
    seg_bytes = dir_bytes(store / "segments")
    return {
        "workers": workers,
        "records": summary["records"],
        "segments": summary["segments"],
        "seconds": summary["seconds"],
        "cluster_start_seconds": summary["startup_seconds"],
        "records_per_s": summary["records_per_s"],
        "records_per_s_without_start": round(summary["records"] / work, 1),
        "mb_per_s_read": round(summary["bytes_read"] / 1e6 / summary["seconds"], 2),
        "bytes_per_segment": round(seg_bytes / max(1, summary["segments"])),
        "store_bytes_per_segment": round(dir_bytes(store) / max(1, summary["segments"])),
        "cpu_ms_per_record": round(rss.cpu_seconds * 1e3 / max(1, summary["records"]), 2),
        "cpu_ms_per_record_driver": round(
            rss.cpu_seconds_root * 1e3 / max(1, summary["records"]), 2
        ),
        "peak_rss_mb": round(rss.peak / 2**20, 1),
        "peak_rss_driver_mb": round(rss.peak_root / 2**20, 1),
    }


def make_real_cohort(root: Path, copies: int) -> Path:
    """The bundled real CinC 2021 samples (data/samples/cinc2021), each copied ``copies`` times
    under new record names: real ECG content for a bytes-per-segment measurement (the synthetic
    cohort's per-sample white noise is incompressible)."""
    samples = REPO / "data" / "samples" / "cinc2021"
    out = root / f"real-{copies}"
    if (out / "done").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for hea in sorted(samples.rglob("*.hea")):
        text, mat = hea.read_text(), hea.with_suffix(".mat").read_bytes()
        for k in range(copies):
            name = f"{hea.stem}c{k:04d}"
            (out / f"{name}.hea").write_text(text.replace(hea.stem, name))
            (out / f"{name}.mat").write_bytes(mat)
    (out / "done").write_text("")
    return out


def run_real(root: Path, copies: int) -> dict:
    from ingestion.pipeline import ingest

    store = root / "store-real"
    shutil.rmtree(store, ignore_errors=True)
    summary = ingest("cinc2021", make_real_cohort(root, copies), store, workers=0, progress=False)
    return {
        "records": summary["records"],
        "segments": summary["segments"],
        "bytes_per_segment": round(dir_bytes(store / "segments") / max(1, summary["segments"])),
    }


def run_naive(src: Path, out: Path, limit: int) -> dict:
    """The original pipeline's shape: loadmat, divide by gain, save each segment as float64 .mat."""
    import numpy as np
    import scipy.io

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    heads = sorted(src.rglob("*.hea"))[:limit]
    t0, cpu0, segments, nbytes = time.perf_counter(), time.process_time(), 0, 0
    for hea in heads:
        lines = hea.read_text().splitlines()
        gains = np.array([float(ln.split()[2].split("/")[0].split("(")[0]) for ln in lines[1:13]])
        mat = hea.with_suffix(".mat")
        nbytes += mat.stat().st_size + hea.stat().st_size
        feats = scipy.io.loadmat(mat)["val"].astype(np.float64) / gains[:, None]
        for k in range(feats.shape[1] // 2500):
            scipy.io.savemat(
                out / f"{hea.stem}_{k}.mat",
                {
                    "feats": feats[:, k * 2500 : (k + 1) * 2500],
                    "curr_sample_rate": 500,
                    "label": np.zeros((1, 26), dtype=bool),
                    "patient_id": 0,
                },
            )
            segments += 1
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {
        "records": len(heads),
        "segments": segments,
        "seconds": round(seconds, 3),
        "cpu_ms_per_record": round(cpu * 1e3 / max(1, len(heads)), 2),
        "records_per_s": round(len(heads) / seconds, 1),
        "mb_per_s_read": round(nbytes / 1e6 / seconds, 2),
        "bytes_per_segment": round(dir_bytes(out) / max(1, segments)),
    }


SAMPLES = REPO / "data" / "samples"
# (name, corpus reader, folder under the samples or --data root, ingest options)
REAL = [
    ("ptbxl", "ptbxl", "ptbxl", {}),
    ("cinc2021", "cinc2021", "cinc2021", {}),
    ("wfdb_misc", "wfdb", "wfdb_misc", {}),
    ("ludb", "ludb", "ludb", {}),
    ("code15", "code15", "code15", {}),
    ("ptbxl_preprocessed", "wfdb", "ptbxl_preprocessed", {"units": "z"}),
]
BUNDLED = ("ptbxl", "cinc2021", "wfdb_misc")


def cpu_flags() -> dict:
    """Model name and the vector/matrix flags of ``lscpu`` (empty where lscpu is missing)."""
    fields = lscpu()
    if not fields:
        return {}
    return {
        "model": fields.get("Model name", "?"),
        "cpus": os.cpu_count(),
        "flags": simd_flags(fields),
    }


def bare_loop(src: Path, rels: list[str]) -> dict:
    """The floor: each record read by its format's reader library and nothing else (the .mat
    files of a .hea naming them with scipy.io.loadmat, every other record with wfdb.rdrecord).
    Records the library cannot read are counted, not timed out of the loop."""
    import scipy.io
    import wfdb

    t0, failed = time.perf_counter(), 0
    for rel in rels:
        mat = src / f"{rel}.mat"
        try:
            if mat.is_file():
                scipy.io.loadmat(mat)
            else:
                wfdb.rdrecord(str(src / rel))
        except Exception:  # noqa: BLE001 - a sample the library rejects (the readers reject it too)
            failed += 1
    seconds = time.perf_counter() - t0
    return {
        "records": len(rels),
        "failed": failed,
        "seconds": round(seconds, 3),
        "records_per_s": round(len(rels) / seconds, 1),
    }


def ingest_rate(corpus: str, src: Path, store: Path, workers: int, opts: dict, batch: int):
    """records/s of one ingest into a fresh store (the cluster start excluded)."""
    from ingestion.pipeline import ingest
    from ingestion.readers.options import ReadOptions

    shutil.rmtree(store, ignore_errors=True)
    summary = ingest(
        corpus,
        src,
        store,
        workers=workers,
        batch_size=batch,
        progress=False,
        opts=ReadOptions(**opts) if opts else None,
    )
    work = summary["seconds"] - summary["startup_seconds"]
    n = summary["records"] + sum(summary["rejected"].values())
    return {
        "workers": workers,
        "records": summary["records"],
        "rejected": sum(summary["rejected"].values()),
        "segments": summary["segments"],
        "seconds": round(work, 3),
        "cluster_start_seconds": summary["startup_seconds"],
        "records_per_s": round(n / work, 1),
    }


def copy_corpus(src: Path, dst: Path) -> Path:
    if not dst.exists():
        shutil.copytree(src, dst)
    return dst


def real_corpus(name: str, corpus: str, root: Path, work: Path, opts: dict, batch: int):
    """Bare loop and in-process ingest of one copied real corpus, in the same run."""
    from ingestion.readers.registry import get_reader

    src = copy_corpus(root, work / f"src-{name}")
    rels = get_reader(corpus).list_records(src)
    bare = bare_loop(src, rels)
    inproc = ingest_rate(corpus, src, work / f"store-{name}", 0, opts, batch)
    return {
        "records": len(rels),
        "bare_records_per_s": bare["records_per_s"],
        "bare_failed": bare["failed"],
        "in_process_records_per_s": inproc["records_per_s"],
        "rejected": inproc["rejected"],
        "in_process_vs_bare": round(bare["records_per_s"] / inproc["records_per_s"], 2),
    }


def replicate_ptbxl(root: Path, out: Path, records: int) -> Path:
    """The PTB-XL records of ``root`` replicated under new names until there are ``records``:
    copy k of record ``NNNNN_hr`` is ``rK/NNNNN_hr_K`` (its .dat hard-linked, its header
    rewritten to name the new files), with ecg_id and patient_id moved by k x 10^6 in the csv."""
    import pandas as pd

    if (out / "ptbxl_database.csv").exists():  # written last: the copy is complete
        return out
    db = pd.read_csv(root / "ptbxl_database.csv")
    copies = -(-records // len(db))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(copies):
        part = db.copy()
        names = []
        for rel in db["filename_hr"]:
            stem = Path(rel).name
            new_rel = f"r{k:03d}/{stem}_{k}"
            (out / new_rel).parent.mkdir(parents=True, exist_ok=True)
            hea = (root / f"{rel}.hea").read_text()
            (out / f"{new_rel}.hea").write_text(hea.replace(stem, f"{stem}_{k}"))
            try:
                os.link(root / f"{rel}.dat", out / f"{new_rel}.dat")
            except OSError:
                shutil.copyfile(root / f"{rel}.dat", out / f"{new_rel}.dat")
            names.append(new_rel)
        part["filename_hr"] = names
        part["ecg_id"] = db["ecg_id"] + k * 10**6
        part["patient_id"] = db["patient_id"] + k * 10**6
        rows.append(part)
    pd.concat(rows).head(records).to_csv(out / "ptbxl_database.csv", index=False)
    return out


def scale_run(root: Path, work: Path, records: int, batch: int) -> dict:
    """Replicated PTB-XL: bare loop, in process, 1 and 2 Dask workers, same run."""
    from ingestion.readers.ptbxl import list_records

    src = replicate_ptbxl(root, work / f"ptbxl-x{records}", records)
    rels = list_records(src)
    bare = bare_loop(src, rels)
    runs = {
        "in_process": ingest_rate("ptbxl", src, work / "store-x0", 0, {}, batch),
        "dask_1_worker": ingest_rate("ptbxl", src, work / "store-x1", 1, {}, batch),
        "dask_2_workers": ingest_rate("ptbxl", src, work / "store-x2", 2, {}, batch),
    }
    rate = {k: v["records_per_s"] for k, v in runs.items()}
    return {
        "records": len(rels),
        "replicated_from": len(set(Path(r).name.rsplit("_", 1)[0] for r in rels)),
        "bare_loop": bare,
        **runs,
        "in_process_vs_bare": round(bare["records_per_s"] / rate["in_process"], 2),
        "dask_1_vs_in_process": round(rate["dask_1_worker"] / rate["in_process"], 2),
        "dask_2_vs_in_process": round(rate["dask_2_workers"] / rate["in_process"], 2),
    }


def real_main(args, root: Path) -> dict:
    corpora = {}
    for name, corpus, folder, opts in REAL:
        for where, base in (("samples", SAMPLES), ("data", args.data)):
            if base is None or (where == "samples" and name not in BUNDLED):
                continue
            path = Path(base) / folder
            if path.is_dir():
                corpora[f"{where}/{name}"] = real_corpus(
                    f"{where}-{name}", corpus, path, root, opts, args.batch_size
                )
    ptbxl = Path(args.data) / "ptbxl" if args.data else SAMPLES / "ptbxl"
    scale = scale_run(ptbxl, root, args.records, args.batch_size)
    return {
        "cpu": cpu_flags(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "corpora": corpora,
        "scale_ptbxl": scale,
        "targets": {
            "in_process<=1.5x_bare (PTB-XL)": scale["in_process_vs_bare"] <= 1.5,
            "dask_1_worker>=0.8x_in_process": scale["dask_1_vs_in_process"] >= 0.8,
            ">=2000_records": scale["records"] >= 2000,
        },
    }


def synthetic_main(args, root: Path) -> dict:
    if args.rss_check:
        runs = {}
        small, large = args.records, 10 * args.records
        for n in (small, large):
            runs[n] = run_pipeline(make_cohort(root, n), root / f"store-{n}", 2, args.batch_size)
        ratio = runs[large]["peak_rss_mb"] / runs[small]["peak_rss_mb"]
        return {
            "rss_check": {str(n): r for n, r in runs.items()},
            f"peak_rss_ratio_{large}_vs_{small}": round(ratio, 3),
            "flat_memory": ratio < 1.15,
        }
    src = make_cohort(root, args.records)
    one = run_pipeline(src, root / "store-1", 1, args.batch_size)
    two = run_pipeline(src, root / "store-2", 2, args.batch_size)
    naive = run_naive(src, root / "naive", args.records)
    real = run_real(root, 25)
    return {
        "records": args.records,
        "cpu_count": os.cpu_count(),
        "dask_1_worker": one,
        "dask_2_workers": two,
        "naive_baseline": naive,
        "real_samples_in_process": real,
        "bytes_per_segment_synthetic": two["bytes_per_segment"],
        "bytes_per_segment_real": real["bytes_per_segment"],
        "speedup_2_vs_1_workers": round(
            two["records_per_s_without_start"] / one["records_per_s_without_start"], 2
        ),
        "speedup_vs_naive": round(two["records_per_s"] / naive["records_per_s"], 2),
        "cpu_cost_ratio_store_vs_naive": round(
            two["cpu_ms_per_record"] / naive["cpu_ms_per_record"], 2
        ),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "storage_ratio_naive_vs_store": round(
            naive["bytes_per_segment"] / two["bytes_per_segment"], 1
        ),
        "targets": {
            "records_per_s_per_worker>=500": one["records_per_s_without_start"] >= 500,
            "bytes_per_segment<=30000 (real ECGs)": real["bytes_per_segment"] <= 30000,
            "2_workers>=1.6x": two["records_per_s_without_start"]
            >= 1.6 * one["records_per_s_without_start"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=None, help="a folder of real corpora (ptbxl/, ludb/, ...)"
    )
    parser.add_argument(
        "--records", type=int, default=2000, help="records of the scale (or synthetic) run"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="records per Dask task")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where copies, cohorts and stores go (default: a temporary directory)",
    )
    parser.add_argument("--synthetic", action="store_true", help="the synthetic-cohort benchmark")
    parser.add_argument(
        "--rss-check",
        action="store_true",
        help="compare peak RSS for --records and 10x --records (synthetic, 2 workers)",
    )
    args = parser.parse_args()
    with workdir(args.workdir, "ecgplat-bench-") as root:
        if args.synthetic or args.rss_check:
            result = synthetic_main(args, root)
        else:
            result = real_main(args, root)
        write_report(result, indent=1)


if __name__ == "__main__":
    main()
