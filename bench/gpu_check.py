"""GPU acceptance run: what the first GPU machine must show, in one JSON and one printed table.

Sections (each one's failure is recorded in the JSON and the run goes on):
  pretrain  `paper` W2V+CMSC+RLM steps in bf16 at `--pairs`: segments/s, TFLOP/s, MFU against
            the card's dense bf16 peak (bench/hardware.py), the measured bf16 GEMM rate and
            the share of it; then the largest batch that fits (pairs doubled until the
            allocator runs out or `--max-pairs`), with its peak memory;
  ddp       the same step wrapped in DistributedDataParallel, one process, NCCL (gloo on a
            CPU): segments/s and its ratio to the bare step (the wrapper's overhead);
  finetune  the diagnosis model (encoder + 26-class head, BCE, CNN frozen as in fine-tuning)
            in bf16: segments/s;
  embed     `unit_embedding` under inference mode in bf16 at the inference batch size:
            segments/s and the share of the GEMM rate;
  faiss     exact inner-product search (IndexFlatIP): build (add) and search of `--queries`
            queries, k=10, over `--vectors` vectors, FAISS-CPU against FAISS-GPU (skipped,
            with the reason, where faiss has no GPU support) and whether both agree;
  loader    the shard loader alone (`data.num_workers` workers) against the pretraining step
            at the same batch: segments/s each and loader/step (>= 1: the GPU never waits).

Without CUDA the same code runs on the CPU at tiny sizes (`tiny` preset, 2 pairs, 2000
vectors), so a typo fails here rather than on the first GPU; `tests/test_gpu_check.py` runs
it that way. `bench/gpu_check.sh` is the entry point (docs: README, "GPU acceptance run").

    python bench/gpu_check.py [--out DIR] [--preset paper] [--pairs 32] [--steps 5] ...
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# the repository root first: bench/retrieval.py would otherwise shadow the retrieval package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import GIB, machine, max_rss_gib, write_json  # noqa: E402

GPU_SIZES = dict(preset="paper", pairs=32, steps=5, max_pairs=512, vectors=1_000_000,
                 queries=10_000, records=128, embed_segments=4096)  # fmt: skip
CPU_SIZES = dict(preset="tiny", pairs=2, steps=2, max_pairs=4, vectors=2000, queries=200,
                 records=8, embed_segments=64)  # fmt: skip
TARGETS = {"mfu": 0.40, "loader_over_step": 1.0}


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _peak_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return max_rss_gib()


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _timed(fn: Callable[[], object], steps: int, device) -> float:
    """Seconds per call of `fn`, after one untimed warm-up call."""
    fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / steps


def _is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


# --- the sections ---------------------------------------------------------------------------


class Check:
    """Shared state: device, sizes, the synthetic shards and the GEMM rate."""

    def __init__(self, args, device, root: Path):
        import torch

        from bench.hardware import gemm_tflops, gpu_peak_bf16_tflops

        self.args, self.device, self.root = args, device, root
        self.gemm = gemm_tflops("bf16", str(device), n=4096 if device.type == "cuda" else 1024)
        self.peak = (
            gpu_peak_bf16_tflops(torch.cuda.get_device_name(device))
            if device.type == "cuda"
            else None
        )
        from bench.pretrain import build_shards

        self.shards = build_shards(root, records=args.records)

    def task(self, pairs: int, workers: int = 0):
        from bench.pretrain import _config
        from training.tasks.pretrain import PretrainTask

        return PretrainTask(_config(self.shards, self.args.preset, pairs, workers))

    def batch(self, task, pairs: int) -> dict:
        """One pair batch of `pairs` pairs on the device (repeated from the shards if needed)."""
        import torch

        from training.step import to_device

        rows = next(iter(task.train_batches(0, 1, 1)))
        reps = -(-2 * pairs // rows["source"].shape[0])
        batch = {}
        for k, v in rows.items():
            if not torch.is_tensor(v):
                batch[k] = v
                continue
            v = torch.cat([v] * reps)[: 2 * pairs]
            if k == "group":  # keep pairs distinct across the repeats
                v = v + torch.arange(len(v)) // rows["source"].shape[0] * (int(v.max()) + 1)
            batch[k] = v
        return to_device(batch, self.device)

    def pretrain_rate(self, pairs: int, wrap: Callable | None = None) -> dict:
        """Seconds per bf16 update at `pairs` pairs, and its FLOP rates."""
        from training.models.flops import pretrain_forward_flops
        from training.optim import LRSchedule, build_optimizer
        from training.precision import autocast
        from training.step import apply_update

        task = self.task(pairs)
        model = task.build_model().to(self.device).train()
        if self.args.compile == "on":
            from training.compile import compile_layers

            compile_layers(model)
        net = wrap(model) if wrap else model
        optimizer = build_optimizer(model.parameters(), task.cfg.optim)
        schedule = LRSchedule(task.cfg.optim)
        batch = self.batch(task, pairs)

        def step():
            with autocast("bf16", self.device):
                loss, n, _ = task.train_step(net, batch, 0)
            loss.backward()
            apply_update(model, optimizer, schedule, 0, n)

        _reset_peak(self.device)
        per_step = _timed(step, self.args.steps, self.device)
        flops = 3 * pretrain_forward_flops(model.encoder.cfg) * 2 * pairs
        out = {
            "pairs": pairs,
            "segments_per_s": 2 * pairs / per_step,
            "step_s": per_step,
            "tflops": flops / per_step / 1e12,
            "gemm_share": flops / per_step / 1e12 / self.gemm,
            "peak_gib": _peak_gib(self.device),
        }
        if self.peak:
            out["mfu"] = flops / per_step / 1e12 / self.peak
        return out

    # each section returns a dict for the JSON

    def pretrain(self) -> dict:
        base = self.pretrain_rate(self.args.pairs)
        largest, pairs = None, self.args.pairs
        while pairs * 2 <= self.args.max_pairs:
            pairs *= 2
            try:
                largest = self.pretrain_rate(pairs)
            except (RuntimeError, MemoryError) as e:
                if not _is_oom(e):
                    raise
                break
        return {**base, "largest_batch": largest}

    def ddp(self, base: dict | None) -> dict:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=f"file://{self.root / 'pg'}", rank=0, world_size=1
        )
        try:
            ids = [self.device.index] if self.device.type == "cuda" else None
            r = self.pretrain_rate(
                self.args.pairs,
                wrap=lambda m: DistributedDataParallel(
                    m, device_ids=ids, find_unused_parameters=False
                ),
            )
        finally:
            dist.destroy_process_group()
        r["backend"] = backend
        if base and "segments_per_s" in base:
            r["over_bare"] = r["segments_per_s"] / base["segments_per_s"]
        return r

    def finetune(self) -> dict:
        import torch
        import torch.nn.functional as F

        from training.models.classifier import DiagnosisModel
        from training.models.encoder import ECGEncoder
        from training.models.encoder_config import get_config
        from training.optim import LRSchedule, build_optimizer
        from training.precision import autocast
        from training.step import apply_update

        task = self.task(self.args.pairs)
        cfg = get_config(self.args.preset, feature_grad_mult=0.0)  # CNN frozen, as fine-tuning
        model = DiagnosisModel(ECGEncoder(cfg)).to(self.device).train()
        optimizer = build_optimizer(model.parameters(), task.cfg.optim)
        schedule = LRSchedule(task.cfg.optim)
        batch = self.batch(task, 2 * self.args.pairs)  # 4x pairs segments: no pair structure
        g = torch.Generator().manual_seed(0)
        target = (torch.rand(batch["source"].shape[0], 26, generator=g) < 0.1).float()
        target = target.to(self.device)

        def step():
            with autocast("bf16", self.device):
                logits = model(batch["source"], batch["lead_mask"])
            loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum")
            loss.backward()
            apply_update(model, optimizer, schedule, 0, target.numel())

        _reset_peak(self.device)
        per_step = _timed(step, self.args.steps, self.device)
        n = batch["source"].shape[0]
        return {"segments": n, "segments_per_s": n / per_step, "peak_gib": _peak_gib(self.device)}

    def embed(self) -> dict:
        import torch

        from training.models.encoder import ECGEncoder
        from training.models.encoder_config import get_config
        from training.models.flops import encoder_forward_flops, inference_batch_size
        from training.models.identifier import unit_embedding
        from training.precision import autocast

        cfg = get_config(self.args.preset)
        encoder = ECGEncoder(cfg).to(self.device).eval()
        bs = inference_batch_size(cfg) * (4 if self.device.type == "cuda" else 1)
        n = max(bs, self.args.embed_segments // bs * bs)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(bs, 12, 2500, generator=g).to(self.device)
        mask = torch.ones(bs, 12, dtype=torch.bool, device=self.device)

        def forward():
            with torch.inference_mode(), autocast("bf16", self.device):
                for _ in range(n // bs):
                    unit_embedding(encoder, x, mask)

        per_run = _timed(forward, 1, self.device)
        rate = n / per_run
        return {
            "batch_size": bs,
            "segments": n,
            "segments_per_s": rate,
            "gemm_share": rate * encoder_forward_flops(cfg) / 1e12 / self.gemm,
        }

    def faiss(self) -> dict:
        import faiss
        import numpy as np
        import torch

        n, q, dim, k = self.args.vectors, self.args.queries, 768, 10
        g = torch.Generator().manual_seed(0)
        # embedding-like vectors: unit norm, generated in float32 in chunks (1 M x 768 = 3 GB)
        x = np.empty((n, dim), dtype=np.float32)
        for s in range(0, n, 65536):
            v = torch.randn(min(65536, n - s), dim, generator=g)
            x[s : s + len(v)] = torch.nn.functional.normalize(v, dim=1).numpy()
        queries = x[:q].copy()
        out: dict = {"vectors": n, "queries": q, "dim": dim, "k": k}

        def run(make) -> tuple[dict, np.ndarray]:
            t = time.perf_counter()
            index = make()
            index.add(x)
            build = time.perf_counter() - t
            t = time.perf_counter()
            _, ids = index.search(queries, k)
            search = time.perf_counter() - t
            return {"build_s": build, "search_s": search, "queries_per_s": q / search}, ids

        out["cpu"], cpu_ids = run(lambda: faiss.IndexFlatIP(dim))
        out["cpu"]["threads"] = faiss.omp_get_max_threads()
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if not hasattr(faiss, "StandardGpuResources") or gpus == 0:
            out["gpu"] = {"skipped": "faiss has no GPU support here (the `gpu` extra: faiss-gpu)"}
            return out
        res = faiss.StandardGpuResources()
        out["gpu"], gpu_ids = run(lambda: faiss.GpuIndexFlatIP(res, dim))
        out["gpu_over_cpu_search"] = out["cpu"]["search_s"] / out["gpu"]["search_s"]
        out["gpu_over_cpu_build"] = out["cpu"]["build_s"] / out["gpu"]["build_s"]
        out["top1_agreement"] = float(np.mean(cpu_ids[:, 0] == gpu_ids[:, 0]))
        return out

    def loader(self, step: dict | None) -> dict:
        workers = self.args.workers
        task = self.task(self.args.pairs, workers)
        n, t0, epoch, first = 0, None, 1, True
        while n < self.args.loader_batches:
            for _ in task.train_batches(0, 1, epoch):
                if first:  # worker start-up is not throughput
                    first, t0 = False, time.perf_counter()
                    continue
                n += 1
                if n >= self.args.loader_batches:
                    break
            epoch += 1
        rate = n * 2 * self.args.pairs / (time.perf_counter() - t0)
        out = {"workers": workers, "batches": n, "segments_per_s": rate}
        if step and "segments_per_s" in step:
            out["step_segments_per_s"] = step["segments_per_s"]
            out["loader_over_step"] = rate / step["segments_per_s"]
        return out


def _section(report: dict, name: str, fn: Callable[[], dict]) -> dict | None:
    t = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as e:  # noqa: BLE001 - recorded, the other sections still run
        report[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    report[name]["seconds"] = time.perf_counter() - t
    print(f"gpu_check: {name} done in {report[name]['seconds']:.1f} s", file=sys.stderr, flush=True)
    return report[name] if "error" not in report[name] else None


def table(report: dict) -> str:
    """The report as a two-column text table (what the shell script prints)."""

    def f(v, fmt="{:.3g}"):
        return "-" if v is None else fmt.format(v)

    def pct(v):
        return f(v, "{:.1%}")

    rows = [("device", report.get("device_name") or report["device"])]
    p = report.get("pretrain", {})
    if "error" in p:
        rows.append(("pretrain", p["error"]))
    elif p:
        rows.append((f"pretrain {report['preset']} bf16, {p['pairs']} pairs",
                     f"{f(p['segments_per_s'])} segments/s"))  # fmt: skip
        rates = f"{f(p['tflops'])} | {pct(p.get('mfu'))} | {pct(p['gemm_share'])}"
        rows.append(("  TFLOP/s | MFU | share of bf16 GEMM rate", rates))
        rows.append(("  peak memory", f"{f(p['peak_gib'])} GiB"))
        big = p.get("largest_batch")
        if big:
            rows.append((f"  largest batch that fit: {big['pairs']} pairs",
                         f"{f(big['segments_per_s'])} segments/s, peak {f(big['peak_gib'])} GiB, "
                         f"MFU {pct(big.get('mfu'))}"))  # fmt: skip
    for name in ("ddp", "finetune", "embed"):
        r = report.get(name, {})
        text = r.get("error") or f"{f(r.get('segments_per_s'))} segments/s"
        if name == "ddp" and "backend" in r:
            text += f" ({r['backend']}, {f(r.get('over_bare'))}x the bare step)"
        rows.append((name, text))
    fa = report.get("faiss", {})
    if "error" in fa:
        rows.append(("faiss", fa["error"]))
    elif fa:
        rows.append((f"faiss flat, {fa['vectors']} x {fa['dim']}, {fa['queries']} queries", ""))
        for side in ("cpu", "gpu"):
            s = fa.get(side, {})
            rows.append((f"  {side}", s.get("skipped") or (
                f"build {f(s['build_s'])} s, search {f(s['search_s'])} s "
                f"({f(s['queries_per_s'])} queries/s)")))  # fmt: skip
    lo = report.get("loader", {})
    rows.append(("loader vs step", lo.get("error") or (
        f"{f(lo.get('segments_per_s'))} vs {f(lo.get('step_segments_per_s'))} segments/s "
        f"({f(lo.get('loader_over_step'))}x)")))  # fmt: skip
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def main(argv: list[str] | None = None) -> dict:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="folder for gpu_check.json (default: a temp dir)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    for key, value in GPU_SIZES.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None,
                       help=f"default {value} on CUDA, {CPU_SIZES[key]} on the CPU")  # fmt: skip
    p.add_argument("--loader-batches", type=int, default=20)
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: cores)")
    p.add_argument("--compile", choices=("on", "off"), default="off",
                   help="compile the transformer layers (training/compile.py)")  # fmt: skip
    p.add_argument("--sections", default="pretrain,ddp,finetune,embed,faiss,loader")
    args = p.parse_args(argv)

    from training.distributed import pick_device

    device = pick_device(args.device)
    sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 1
    sections = args.sections.split(",")
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="ecgplat-gpu-check-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "preset": args.preset,
        "sizes": {k: getattr(args, k) for k in GPU_SIZES},
        "compile": args.compile,
        "targets": TARGETS,
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ecgplat-gpu-check-") as tmp:
        check = Check(args, device, Path(tmp))
        report.update(gemm_bf16_tflops=check.gemm, peak_bf16_tflops=check.peak)
        base = _section(report, "pretrain", check.pretrain) if "pretrain" in sections else None
        if "ddp" in sections:
            _section(report, "ddp", lambda: check.ddp(base))
        if "finetune" in sections:
            _section(report, "finetune", check.finetune)
        if "embed" in sections:
            _section(report, "embed", check.embed)
        if "faiss" in sections:
            _section(report, "faiss", check.faiss)
        if "loader" in sections:
            _section(report, "loader", lambda: check.loader(base))
    report["seconds"] = time.perf_counter() - t0
    report.update(**machine(), python=sys.version.split()[0])
    write_json(out_dir / "gpu_check.json", report)
    print(table(report))
    print(f"gpu_check: {out_dir / 'gpu_check.json'}")
    return report


if __name__ == "__main__":
    main()
