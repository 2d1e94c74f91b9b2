"""Pretraining throughput benchmark: loader alone vs full training steps, per model preset.

For each preset (default `tiny` and `paper`) a fresh child process measures
  (a) the shard loader alone (`training.data` pair batches with RLM, `data.num_workers`
      DataLoader workers): segments/s;
  (b) full training steps (W2V+CMSC forward, criterion, backward, gradient normalisation,
      Adam) on prefetched batches: segments/s, s/step;
and its peak RSS. The ratio loader/steps says how far the loader is from being the
bottleneck. The steps are measured in every precision of `--precisions` (default fp32 and
bf16 autocast, one child process each), and each result carries the model's analytic FLOPs per
segment (matmuls and convolutions, forward x 3 for forward + backward), the GEMM rate of a plain
torch.mm in that dtype measured in the same process, and the utilisation: achieved FLOP/s over
that GEMM rate (and, on CUDA, the MFU over the device's datasheet peak). The GEMM rate is taken
before and after the steps (the better one counts: other jobs only lower it), both per second
of wall time (`utilisation`) and per CPU-second of the process (`utilisation_cpu`: the step's
FLOP per CPU-second over torch.mm's, the ratio a shared machine disturbs least). With
`--compile off,on` each precision also runs with the transformer layers compiled
(training/compile.py). The report carries the CPU flags (lscpu), the bf16/fp32 speed-up per
preset and the compiled/eager one.

`--fit-check`: one forward + backward of the paper preset at the paper's per-GPU batch of
64 pairs = 128 segments; reports its peak RSS (CPU) or peak CUDA memory (must fit 24 GiB).
On CPU it first extrapolates from 4 and 8 pairs and runs the full batch only if that fits
the free memory (`--estimate-only` skips it).

Without `--shards` a synthetic cohort is generated and ingested through the real pipeline
(`ingestion.synth` -> store -> shards) in a temporary directory. Output: JSON on stdout
(and in `--out FILE` if given).

    python bench/pretrain.py [--presets tiny,paper] [--pairs 8] [--steps 3] [--precisions fp32,bf16]
                             [--compile off,on]
    python bench/pretrain.py --fit-check [--estimate-only]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

# the repository root first: bench/retrieval.py would otherwise shadow the retrieval package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import GIB, machine, max_rss_gib, workdir, write_report  # noqa: E402

CPU_TARGETS = {
    "paper_steps_segments_per_s": 1.5,
    "peak_rss_gib": 3.2,
    "loader_over_steps": 20.0,
    "fit_check_peak_gib": 24.0,
}


def build_shards(root: Path, records: int = 64) -> Path:
    """A synthetic cohort (20 s records = 2 CMSC pairs each) -> store -> train shards."""
    from ingestion.pipeline import ingest
    from ingestion.shards import write_shards
    from ingestion.splits import split_store
    from ingestion.synth import write_cohort

    write_cohort(root / "cohort", records // 2, 2, seconds=20, seed=0)
    ingest("cinc2021", root / "cohort", root / "store", workers=0, progress=False)
    split_store(root / "store", mode="random", valid=0.0, test=0.0, seed=0)
    write_shards(root / "store", "train", root / "shards", max_count=16)
    return root / "shards"


def _config(shards: Path, preset: str, pairs: int, workers: int):
    from training.run_config import load_config

    return load_config(
        "w2v_cmsc_rlm",
        [
            f"data.shards={shards}",
            f"model.preset={preset}",
            f"data.batch_size={pairs}",
            f"data.num_workers={workers}",
            "logging.wandb_mode=disabled",
            "data.shuffle_buffer=16",
        ],
    )


def measure(
    preset: str,
    shards: str,
    pairs: int,
    steps: int,
    loader_batches: int,
    workers: int,
    fit_check: bool,
    precision: str = "fp32",
    compile: str = "off",
) -> dict:
    """Runs in a child process: loader and step throughput of one preset in one precision."""
    import psutil
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    from training.distributed import limit_heap_growth, pick_device

    limit_heap_growth()  # what training.loop.train does on the CPU
    from bench.hardware import gemm_rates, gpu_peak_bf16_tflops
    from training.compile import compile_layers, is_compiled
    from training.models.flops import pretrain_forward_flops
    from training.optim import LRSchedule, build_optimizer
    from training.precision import autocast as precision_autocast
    from training.precision import resolve_precision
    from training.step import apply_update, to_device
    from training.tasks.pretrain import PretrainTask

    cfg = _config(Path(shards), preset, pairs, workers)
    device = pick_device("auto")
    result = {
        "preset": preset,
        "device": str(device),
        "pairs": pairs,
        "segments": 2 * pairs,
        "threads": torch.get_num_threads(),
        "precision": resolve_precision(precision, device),
        "compile": compile,
    }
    task = PretrainTask(cfg)

    if not fit_check and loader_batches > 0:  # (a) the loader alone, repeating epochs
        n, t0, epoch, first = 0, None, 1, True
        while n < loader_batches:
            for _batch in task.train_batches(0, 1, epoch):
                if first:  # worker start-up is not throughput
                    first, t0 = False, time.perf_counter()
                    continue
                n += 1
                if n >= loader_batches:
                    break
            epoch += 1
        loader = n * 2 * pairs / (time.perf_counter() - t0)
        result["loader_segments_per_s"] = loader

    # (b) full training steps on prefetched batches
    torch.manual_seed(0)
    model = task.build_model().to(device).train()
    if compile == "on":
        compile_layers(model)  # compiled in the first (untimed) step
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    schedule = LRSchedule(cfg.optim)
    batch = to_device(next(iter(task.train_batches(0, 1, 1))), device)
    autocast = precision_autocast(result["precision"], device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    cpu_times, rss_after_forward = [], []

    def step() -> float:
        t, c = time.perf_counter(), time.process_time()
        with autocast:
            loss, sample_size, _ = task.train_step(model, batch, 0)
        rss_after_forward.append(psutil.Process().memory_info().rss / GIB)
        loss.backward()
        apply_update(model, optimizer, schedule, 0, sample_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        cpu_times.append(time.process_time() - c)
        return time.perf_counter() - t

    # the GEMM rate before and after the steps (the better of the two: contention only lowers it)
    gemm_before = None if fit_check else gemm_rates(result["precision"], str(device))
    times = [step() for _ in range(1 if fit_check else steps + 1)]
    timed = times if fit_check else times[1:]  # the first step warms up allocators / kernels
    result["first_step_s"] = times[0]  # includes the compile with compile=on
    if compile == "on":
        result["compiled"] = is_compiled(model)
    per_step = sum(timed) / len(timed)
    cpu_per_step = sum(cpu_times[-len(timed) :]) / len(timed)
    # on a shared host wall time includes waiting for the CPU; CPU seconds / threads is
    # what the step would take with the cores to itself (an estimate, assumes full scaling)
    result.update(
        step_cpu_s=cpu_per_step,
        uncontended_estimate_segments_per_s=2 * pairs * torch.get_num_threads() / cpu_per_step
        if device.type == "cpu"
        else None,
    )
    result.update(
        rss_after_forward_gib=max(rss_after_forward),
        param_gib=sum(p.numel() * p.element_size() for p in model.parameters()) / GIB,
    )
    result.update(
        step_s=per_step,
        steps_timed=len(timed),
        steps_segments_per_s=2 * pairs / per_step,
        peak_rss_gib=max_rss_gib(),
    )
    flops = 3 * pretrain_forward_flops(model.encoder.cfg) * 2 * pairs
    rates = [gemm_before or gemm_rates(result["precision"], str(device))]
    rates.append(gemm_rates(result["precision"], str(device)))
    gemm = max(r["wall"] for r in rates) * 1e12
    gemm_cpu = max(r["cpu"] for r in rates) * 1e12
    result.update(
        gflop_per_segment_step=flops / (2 * pairs) / 1e9,
        step_tflops=flops / per_step / 1e12,
        gemm_tflops=gemm / 1e12,
        gemm_tflops_before_after=[r["wall"] for r in rates],
        utilisation=flops / per_step / gemm,
        # FLOP per CPU-second of the step over FLOP per CPU-second of torch.mm: the ratio
        # that other jobs on a shared machine disturb least
        utilisation_cpu=flops / cpu_per_step / gemm_cpu,
    )
    if device.type == "cuda":
        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / GIB
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_bf16_tflops(name)
        result.update(gpu=name, mfu=(flops / per_step / peak / 1e12) if peak else None)
    if "loader_segments_per_s" in result:
        result["loader_over_steps"] = (
            result["loader_segments_per_s"] / result["steps_segments_per_s"]
        )
    return result


def _child(queue, kwargs):
    # a spawned child inherits "spawn" as its default start method, which would make every
    # epoch's DataLoader workers re-import torch; training processes use the platform default
    if "fork" in mp.get_all_start_methods():
        mp.set_start_method("fork", force=True)
    try:
        queue.put(measure(**kwargs))
    except BaseException as e:  # noqa: BLE001 - reported in the JSON
        queue.put({"preset": kwargs["preset"], "error": f"{type(e).__name__}: {e}"})


def run_isolated(**kwargs) -> dict:
    """`measure` in a fresh process so that each preset's peak RSS is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, kwargs))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def fit_check(common: dict, pairs: int = 64, run_full: bool = True) -> dict:
    """Peak memory of one paper-preset forward+backward at `pairs` pairs.

    On CUDA it is measured directly. On a CPU host, where the run needs most of the machine's
    RAM, the memory after the forward pass (weights + live activations) is first measured at
    4 and 8 pairs and extrapolated linearly to `pairs`, plus the gradients and a 10% margin
    for backward temporaries (the small runs' own peak is the first optimizer step, not the
    activations). The full run happens only when `run_full` and the estimate fits the free
    memory with a 15% margin, so the check never drives a shared machine out of memory."""
    import psutil
    import torch

    limit = CPU_TARGETS["fit_check_peak_gib"]
    if torch.cuda.is_available():
        r = run_isolated(preset="paper", pairs=pairs, steps=1, fit_check=True, **common)
        r["fits_24_gib"] = "peak_cuda_gib" in r and r["peak_cuda_gib"] <= limit
        return r
    small = [
        run_isolated(preset="paper", pairs=p, steps=1, fit_check=True, **common) for p in (4, 8)
    ]
    if any("error" in r for r in small):
        return {"error": [r.get("error") for r in small]}
    fwd = [r["rss_after_forward_gib"] for r in small]
    per_pair = (fwd[1] - fwd[0]) / 4
    estimate = 1.1 * (fwd[1] + per_pair * (pairs - 8) + small[1]["param_gib"])
    available = psutil.virtual_memory().available / GIB
    report = {
        "pairs": pairs,
        "segments": 2 * pairs,
        "device": "cpu",
        "rss_after_forward_gib_at_4_8_pairs": fwd,
        "activation_gib_per_pair": per_pair,
        "estimated_peak_rss_gib": estimate,
        "available_gib": available,
    }
    if run_full and estimate * 1.15 < available:
        full = run_isolated(preset="paper", pairs=pairs, steps=1, fit_check=True, **common)
        report.update(measured=full, ran=True)
        peak = full.get("peak_rss_gib", estimate)
    else:
        report.update(
            ran=False,
            reason="estimate only (--estimate-only, or the estimate "
            "does not fit this host's free memory)",
        )
        peak = estimate
    report["fits_24_gib"] = peak <= limit
    return report


def speedups(results: list[dict]) -> dict:
    """bf16 segments/s over fp32 segments/s of the same run, per preset (and compile choice
    when both were measured: key `preset+compile`), and compiled over eager per preset and
    precision (`preset/precision`)."""
    rate = {
        (r["preset"], r.get("precision"), r.get("compile", "off")): r["steps_segments_per_s"]
        for r in results
        if "steps_segments_per_s" in r
    }
    out: dict = {"bf16_over_fp32": {}, "compiled_over_eager": {}}
    compiles = {c for _, _, c in rate}
    for (preset, precision, comp), value in rate.items():
        key = preset if len(compiles) == 1 else f"{preset}+compile={comp}"
        if precision == "fp32" and (preset, "bf16", comp) in rate:
            out["bf16_over_fp32"][key] = rate[(preset, "bf16", comp)] / value
        if comp == "off" and (preset, precision, "on") in rate:
            out["compiled_over_eager"][f"{preset}/{precision}"] = (
                rate[(preset, precision, "on")] / value
            )
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="tiny,paper", help="comma list of model presets")
    p.add_argument("--pairs", type=int, default=8, help="pairs per micro-batch (segments = 2x)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per preset")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list: fp32, bf16, auto")
    p.add_argument("--loader-batches", type=int, default=40, help="batches timed for the loader")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers of the loader")
    p.add_argument("--shards", default=None, help="shard directory (default: synthetic)")
    p.add_argument(
        "--fit-check",
        action="store_true",
        help="one forward+backward of the paper preset with 64 pairs (128 segments)",
    )
    p.add_argument(
        "--estimate-only",
        action="store_true",
        help="with --fit-check on CPU: extrapolate from 4 and 8 pairs, skip the full 64-pair run",
    )
    p.add_argument(
        "--compile",
        default="off",
        help="comma list of off, on: transformer layers eager and/or torch.compile'd "
        "(training/compile.py; the compile happens in the untimed first step)",
    )
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    args = p.parse_args(argv)

    with workdir(None, "ecgplat-bench-") as tmp:
        shards = args.shards or str(build_shards(tmp))
        common = dict(shards=shards, workers=args.workers)
        if args.fit_check:
            common["loader_batches"] = 0
            report = {"fit_check": fit_check(common, run_full=not args.estimate_only)}
        else:
            results = [
                run_isolated(
                    preset=name,
                    pairs=args.pairs,
                    steps=args.steps,
                    fit_check=False,
                    precision=precision,
                    compile=comp,
                    loader_batches=args.loader_batches if i == j == 0 else 0,  # once per preset
                    **common,
                )
                for name in args.presets.split(",")
                for i, precision in enumerate(args.precisions.split(","))
                for j, comp in enumerate(args.compile.split(","))
            ]
            report = {"results": results, **speedups(results), "cpu_targets": CPU_TARGETS}
    report.update(**machine(), python=sys.version.split()[0], cpu_count=os.cpu_count())
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
