"""Load and latency of `ecgplat serve` on loopback, against `ecgplat query` from a cold start.

The world (unless `--store/--index/--checkpoint` name one, e.g. `demo_out/`): a demo-sized
store, a synthetic cohort (`--patients` x 3 records of 10 s) split with a gallery and probes,
embedded with the committed real-data `tiny` checkpoint (bench/results/real_study), its flat
gallery index and a diagnosis checkpoint of that encoder (an untrained head: the latency is the
model's, not its weights'). The service is the real command line, `ecgplat serve`, in its own
process (`OMP_NUM_THREADS=1`, its default 2 worker threads); the clients are httpx async
clients in this process, on the same 2 cores. Every request loop is bounded in count and time.

Measured, each at 1, 8 and 32 concurrent clients: latency p50/p95/p99 (ms, client side) and
throughput (answers/s) of

* ``query_by_key``: ``POST /query`` with a stored probe's key (k = 5);
* ``upload_query``: ``POST /query`` with a real PhysioNet record's files (.hea + .mat, 10 s);
* ``predict``: ``POST /predict`` with the same upload;

and, in the same run: ``ecgplat query --record KEY`` as a user runs it (a new process: imports,
index and store read, one answer; the median of `--cli-runs`), the ratio of its time to the
service's query-by-key p50; query by key against a ``--million``-vector IVF gallery (the real
gallery rows plus synthetic unit vectors, built here, served by a second process); and a mixed
upload run where 10 % of the uploads are malformed (not an ECG, a truncated signal, a zip bomb,
a zip escaping with ../) while /health is polled every 50 ms: the service must answer every
valid upload with 200, every malformed one with a 4xx, and /health throughout.

Prints one JSON document (no absolute paths; the CPU's flags from lscpu) and writes it to
`--out` (default bench/results/serve.json).

    python bench/serve.py [--out bench/results/serve.json] [--million 1000000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

# the repository root first: bench/retrieval.py would otherwise shadow the retrieval package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, machine, workdir, write_report  # noqa: E402

CHECKPOINT = REPO / "bench" / "results" / "real_study" / "pretrained_tiny.pt"
RECORD = REPO / "data" / "samples" / "cinc2021" / "georgia" / "E07500"
TARGETS = {
    "query_by_key_p50_ms": 20.0,
    "upload_query_p50_ms": 150.0,
    "speedup_vs_cli": 50.0,
    "million_query_by_key_p50_ms": 50.0,
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ECGPLAT_CPU_BF16": "0"}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the world -------------------------------------------------------------------------------


def build_world(work: Path, patients: int) -> dict:
    import torch

    from ingestion.pipeline import ingest
    from ingestion.splits import split_store
    from ingestion.synth import write_cohort
    from retrieval.embed import embed_store
    from retrieval.index import index_from_features
    from training.models.checkpoint_file import load_encoder, save_checkpoint
    from training.models.classifier import DiagnosisModel

    store, index, dx = work / "store.zarr", work / "gallery.faiss", work / "diagnosis.pt"
    if index.is_file() and dx.is_file():
        return {"store": store, "index": index, "checkpoint": dx}
    shutil.rmtree(store, ignore_errors=True)
    write_cohort(work / "cohort", patients, 3, seconds=10.0, seed=7)
    ingest("cinc2021", work / "cohort", store, workers=0, progress=False)
    split_store(store, mode="random", valid=0.15, test=0.3, seed=1, ident=True)
    pt = work / "encoder.pt"
    shutil.copy(CHECKPOINT, pt)
    embed_store(store, pt, "emb", progress=False)
    index_from_features(store, "emb", split="gallery").save(index)
    torch.manual_seed(0)
    model = DiagnosisModel(load_encoder(pt))
    save_checkpoint(
        dx, kind="diagnosis", encoder_config=model.encoder.cfg, model=model.state_dict()
    )
    return {"store": store, "index": index, "checkpoint": dx}


def probe_keys(store: Path) -> list[str]:
    from ecgplat.store import open_store

    st = open_store(store)
    idx = st.select(ident_split="probe")
    return [str(k) for k in st.column("record_key")[idx]]


def million_index(world: dict, n: int, work: Path, seed: int = 0) -> tuple[Path, dict]:
    """An IVF index of the real gallery rows plus `n - gallery` synthetic unit vectors, with the
    real index's lineage (so query by key works), and what building it took."""
    import numpy as np

    from retrieval.index import GalleryIndex, build_index
    from retrieval.index.gallery import unit_float32

    path = work / f"ivf_{n}.faiss"
    real = GalleryIndex.load(world["index"])
    vectors = real.index.reconstruct_n(0, real.n_main)
    m = n - len(real)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    synth = np.empty((m, real.dim), dtype=np.float32)
    for s in range(0, m, 100_000):
        synth[s : s + 100_000] = unit_float32(rng.standard_normal((min(100_000, m - s), real.dim)))
    allv = np.concatenate([vectors, synth])
    del synth
    ids = list(real.ids) + [f"synthetic/{i:07d}" for i in range(m)]
    labels = list(real.labels or [""] * len(real)) + [f"p-synthetic{i // 3:07d}" for i in range(m)]
    params = {"nlist": 1024, "nprobe": 16, "max_train": 65_536}
    gallery = build_index(allv, ids, dict(real.lineage), "ivf", labels, n_sample=0, params=params)
    gallery.save(path)
    return path, {
        "vectors": n,
        "real_rows": len(real),
        "params": params,
        "build_s": round(time.perf_counter() - t0, 1),
    }


# ---- the service -----------------------------------------------------------------------------


class Service:
    """`ecgplat serve` in its own process on a free loopback port."""

    def __init__(self, store: Path, index: Path, checkpoint: Path | None, log_file: Path):
        self.log_file = log_file  # its access log: a pipe nobody reads would fill and block it
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "ecgplat", "serve", "--store", str(store)]
        self.cmd += ["--index", str(index), "--port", str(self.port)]
        self.cmd += ["--rate", "100000", "--burst", "100000"]  # no rate limit in the way
        if checkpoint is not None:
            self.cmd += ["--checkpoint", str(checkpoint)]

    def __enter__(self) -> Service:
        import httpx

        t0 = time.perf_counter()
        self.log = open(self.log_file, "wb")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(self.cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=self.log)
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("ecgplat serve exited: " + self.log_file.read_text()[-2000:])
            if time.perf_counter() - t0 > 300:
                raise RuntimeError("ecgplat serve did not start in 300 s")
            time.sleep(0.1)
        self.startup_s = round(time.perf_counter() - t0, 2)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ---- load ------------------------------------------------------------------------------------


def percentiles(ms: list[float]) -> dict:
    import numpy as np

    a = np.asarray(ms)
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p95_ms": round(float(np.percentile(a, 95)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "mean_ms": round(float(a.mean()), 2),
    }


async def run_load(url: str, make_request, concurrency: int, n: int, seconds: float) -> dict:
    """`n` requests (at most `seconds`) from `concurrency` clients; each `make_request(i)` is
    (method, path, kwargs, expected status or None for any 4xx)."""
    import httpx

    latencies, statuses, wrong = [], {}, 0
    counter = iter(range(n))
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker():
            nonlocal wrong
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                method, path, kwargs, want = make_request(i)
                t = time.perf_counter()
                r = await client.request(method, path, **kwargs)
                latencies.append((time.perf_counter() - t) * 1000)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if (want is None and not 400 <= r.status_code < 500) or (
                    want is not None and r.status_code != want
                ):
                    wrong += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "throughput_per_s": round(len(latencies) / wall, 1),
        **percentiles(latencies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "unexpected": wrong,
    }


def scenarios(world: dict, keys: list[str]) -> dict:
    files = [RECORD.with_suffix(".hea"), RECORD.with_suffix(".mat")]
    blobs = [(p.name, p.read_bytes()) for p in files]

    def by_key(i):
        return "POST", "/query", {"data": {"key": keys[i % len(keys)], "k": "5"}}, 200

    def upload(i):
        return "POST", "/query", {"files": [("files", b) for b in blobs], "data": {"k": "5"}}, 200

    def predict(i):
        return "POST", "/predict", {"files": [("files", b) for b in blobs]}, 200

    return {"query_by_key": by_key, "upload_query": upload, "predict": predict}


def malformed_uploads() -> list[list]:
    hea, mat = RECORD.with_suffix(".hea"), RECORD.with_suffix(".mat")
    bomb, escape = io.BytesIO(), io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("a.hea", b"\0" * (200 * 2**20))
    with zipfile.ZipFile(escape, "w") as z:
        z.writestr("../../x.hea", hea.read_bytes())
        z.writestr("../../x.mat", mat.read_bytes())
    return [
        [("files", ("notes.txt", b"not an ECG at all\n"))],
        [("files", (hea.name, hea.read_bytes())), ("files", (mat.name, mat.read_bytes()[:3000]))],
        [("files", ("bomb.zip", bomb.getvalue()))],
        [("files", ("escape.zip", escape.getvalue()))],
    ]


async def mixed_run(url: str, n: int, concurrency: int, seconds: float) -> dict:
    """Uploads, one in ten malformed, while /health is polled every 50 ms."""
    import httpx

    bad = malformed_uploads()
    good = scenarios({}, ["-"])["upload_query"]

    def make(i):
        if i % 10 == 9:
            return "POST", "/query", {"files": bad[(i // 10) % len(bad)]}, None
        return good(i)

    health_ms, health_fail, stop = [], 0, asyncio.Event()

    async def poll():
        nonlocal health_fail
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    ok = (await client.get("/health")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                health_ms.append((time.perf_counter() - t) * 1000)
                health_fail += not ok
                await asyncio.sleep(0.05)

    poller = asyncio.create_task(poll())
    load = await run_load(url, make, concurrency, n, seconds)
    stop.set()
    await poller
    return {
        **load,
        "malformed_fraction": 0.1,
        "health_polls": len(health_ms),
        "health_failures": health_fail,
        "health": percentiles(health_ms),
    }


def cli_cold_start(world: dict, key: str, runs: int) -> dict:
    cmd = [sys.executable, "-m", "ecgplat", "query", "--index", str(world["index"])]
    cmd += ["--record", key, "--k", "5"]
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, env=ENV, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return {
        "runs": runs,
        "median_s": round(statistics.median(times), 3),
        "all_s": [round(t, 3) for t in times],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve.json")
    ap.add_argument("--work", type=Path, default=None, help="keep the world here (default: tmp)")
    ap.add_argument("--store", type=Path)
    ap.add_argument("--index", type=Path)
    ap.add_argument("--checkpoint", type=Path, help="a fine-tuned checkpoint for /predict")
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--requests", type=int, default=200, help="per scenario and concurrency")
    ap.add_argument("--seconds", type=float, default=60.0, help="cap per scenario and concurrency")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--cli-runs", type=int, default=3)
    ap.add_argument("--million", type=int, default=1_000_000, help="IVF gallery size (0: skip)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a check that it runs")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.seconds, args.million, args.cli_runs = 20, 10.0, 20_000, 1
    report: dict = {"benchmark": "serve", **machine(), "targets": TARGETS}
    report["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    with workdir(args.work, "ecgplat-bench-serve-") as work:
        if args.store and args.index:
            world = {"store": args.store, "index": args.index, "checkpoint": args.checkpoint}
            report["world"] = "given (--store/--index)"
        else:
            log("building the world ...")
            world = build_world(work, args.patients)
            report["world"] = (
                f"synthetic cohort, {args.patients} patients x 3 records of 10 s; "
                "bench/results/real_study/pretrained_tiny.pt (tiny); flat gallery index"
            )
        keys = probe_keys(world["store"])
        results: dict = {}
        with Service(
            world["store"], world["index"], world["checkpoint"], work / "serve.log"
        ) as svc:
            report["startup_s"] = svc.startup_s
            for name, make in scenarios(world, keys).items():
                if name == "predict" and world["checkpoint"] is None:
                    continue
                results[name] = []
                for c in args.concurrency:
                    n = max(args.requests, 4 * c)
                    log(f"{name} at {c} clients ...")
                    results[name].append(asyncio.run(run_load(svc.url, make, c, n, args.seconds)))
            log("mixed uploads, 10 % malformed ...")
            report["malformed_mix"] = asyncio.run(
                mixed_run(svc.url, args.requests, 8, args.seconds)
            )
        report["scenarios"] = results
        log("ecgplat query from a cold start ...")
        cold = cli_cold_start(world, keys[0], args.cli_runs)
        p50 = results["query_by_key"][0]["p50_ms"]
        report["cli_cold_start"] = cold
        report["speedup_vs_cli"] = round(cold["median_s"] * 1000 / p50, 1)
        if args.million:
            log(f"building a {args.million}-vector IVF gallery ...")
            path, built = million_index(world, args.million, work)
            with Service(world["store"], path, None, work / "serve_million.log") as svc:
                by_key = scenarios(world, keys)["query_by_key"]
                runs = [
                    asyncio.run(
                        run_load(svc.url, by_key, c, max(args.requests, 4 * c), args.seconds)
                    )
                    for c in args.concurrency
                ]
                report["million_ivf"] = {**built, "startup_s": svc.startup_s, "query_by_key": runs}
    up = results["upload_query"][0]["p50_ms"]
    report["met"] = {
        "query_by_key_p50_ms": p50 <= TARGETS["query_by_key_p50_ms"],
        "upload_query_p50_ms": up <= TARGETS["upload_query_p50_ms"],
        "speedup_vs_cli": report["speedup_vs_cli"] >= TARGETS["speedup_vs_cli"],
    }
    if "million_ivf" in report:
        m = report["million_ivf"]["query_by_key"][0]["p50_ms"]
        report["met"]["million_query_by_key_p50_ms"] = m <= TARGETS["million_query_by_key_p50_ms"]
    mix = report["malformed_mix"]
    report["met"]["health_throughout_malformed_mix"] = (
        mix["health_failures"] == 0 and mix["unexpected"] == 0
    )
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_report(report, args.out)
    print(json.dumps(report["met"]), file=sys.stderr)


if __name__ == "__main__":
    main()
