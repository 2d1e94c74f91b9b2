"""Ingest benchmark: Dask pipeline with 1 and 2 workers against the original's naive loop.

Writes a synthetic CinC-2021-format cohort (``--records``, 10 s each), ingests it into fresh
stores with 1 and 2 Dask workers and prints one JSON object: records/s (end to end and without
the cluster start), MB/s read, bytes per stored segment, peak RSS of driver + workers (psutil,
sampled every 50 ms), the 2-vs-1 worker speed-up, and the ratio against a naive baseline written
here: a plain loop that reads each record with scipy.io.loadmat and saves one float64 ``.mat``
per 5 s segment (what the paper's preprocessing script does). Bytes per stored segment are also
measured on real ECGs (the bundled CinC 2021 samples copied 25x, ingested in-process): the
synthetic cohort's white noise is incompressible, the size target is about real data.

``--rss-check`` instead ingests ``--records`` and 10x as many records with 2 workers and
compares peak RSS (the pipeline's memory must not grow with the corpus).

    python bench/ingest.py [--records 2000] [--workdir DIR] [--rss-check]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


class PeakRSS:
    """Peak summed RSS of this process and all its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self.proc, self.interval, self.peak, self.peak_driver = psutil.Process(), interval, 0, 0
        self.cpu: dict[int, float] = {}  # last seen user+sys CPU seconds per process
        self.cpu_start = sum(self.proc.cpu_times()[:2])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a child that just exited
                total += p.memory_info().rss
                self.cpu[p.pid] = sum(p.cpu_times()[:2])
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self.peak_driver = max(self.peak_driver, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.cpu[self.proc.pid] = sum(self.proc.cpu_times()[:2])

    @property
    def cpu_seconds_driver(self) -> float:
        return self.cpu.get(self.proc.pid, 0.0) - self.cpu_start

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds used by this process and its children while sampling (contention-free
        cost, unlike wall time on a shared machine)."""
        return sum(self.cpu.values()) - self.cpu_start


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


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
    with PeakRSS() as rss:
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
            rss.cpu_seconds_driver * 1e3 / max(1, summary["records"]), 2
        ),
        "peak_rss_mb": round(rss.peak / 2**20, 1),
        "peak_rss_driver_mb": round(rss.peak_driver / 2**20, 1),
    }


def make_real_cohort(root: Path, copies: int) -> Path:
    """The bundled real CinC 2021 samples (data/samples/cinc2021), each copied ``copies`` times
    under new record names: real ECG content for a bytes-per-segment measurement (the synthetic
    cohort's per-sample white noise is incompressible)."""
    samples = Path(__file__).resolve().parents[1] / "data" / "samples" / "cinc2021"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000, help="synthetic records to ingest")
    parser.add_argument("--batch-size", type=int, default=128, help="records per Dask task")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where cohorts and stores go (default: a temporary directory)",
    )
    parser.add_argument(
        "--rss-check",
        action="store_true",
        help="compare peak RSS for --records and 10x --records (2 workers)",
    )
    args = parser.parse_args()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ecgplat-bench-")
        root = Path(tmp.name)
    else:
        root = args.workdir
        root.mkdir(parents=True, exist_ok=True)
    try:
        if args.rss_check:
            runs = {}
            small, large = args.records, 10 * args.records
            for n in (small, large):
                runs[n] = run_pipeline(
                    make_cohort(root, n), root / f"store-{n}", 2, args.batch_size
                )
            ratio = runs[large]["peak_rss_mb"] / runs[small]["peak_rss_mb"]
            result = {
                "rss_check": {str(n): r for n, r in runs.items()},
                f"peak_rss_ratio_{large}_vs_{small}": round(ratio, 3),
                "flat_memory": ratio < 1.15,
            }
        else:
            src = make_cohort(root, args.records)
            one = run_pipeline(src, root / "store-1", 1, args.batch_size)
            two = run_pipeline(src, root / "store-2", 2, args.batch_size)
            naive = run_naive(src, root / "naive", args.records)
            real = run_real(root, 25)
            result = {
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
        print(json.dumps(result, indent=1))
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
