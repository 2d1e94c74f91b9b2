"""The machine the benchmarks measure the model against: its CPU flags (`lscpu`) and the GEMM
rate of a plain torch.mm per dtype (used through bench/common.py by the benchmark reports)."""

from __future__ import annotations

import platform
import subprocess
import time

FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4")


def lscpu() -> dict[str, str]:
    """The `lscpu` fields by name (empty where lscpu is missing or fails)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    return dict(
        (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in text.splitlines())
    )


def simd_flags(fields: dict[str, str]) -> list[str]:
    """The SIMD/matrix flags (avx*, amx*, fma, f16c, sse4*) of `lscpu` fields, sorted."""
    return sorted(f for f in fields.get("Flags", "").split() if f.startswith(FLAG_PREFIXES))


def cpu_info() -> dict:
    """Model name, thread count and the SIMD/matrix flags from `lscpu` (empty off Linux), and
    what torch reports about native bf16."""
    import torch

    info = {"machine": platform.machine(), "torch": torch.__version__}
    fields = lscpu()
    info.update(
        model=fields.get("Model name"),
        cpus=fields.get("CPU(s)"),
        flags=simd_flags(fields),
        amx=torch.cpu._is_amx_tile_supported(),
        avx512_bf16=torch.cpu._is_avx512_bf16_supported(),
    )
    return info


def gemm_rates(dtype: str, device: str = "cpu", n: int = 2048, repeats: int = 3) -> dict:
    """`gemm_tflops` seen two ways, best of `repeats`: `wall` TFLOP/s per second of wall time
    and `cpu` TFLOP per CPU-second of this process (threads x time; on a shared machine the
    CPU-time rate is the one other jobs disturb least)."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b)
    sync()
    wall = cpu = float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        sync()
        wall = min(wall, time.perf_counter() - t)
        cpu = min(cpu, max(time.process_time() - c, 1e-9))
    return {"wall": 2.0 * n**3 / wall / 1e12, "cpu": 2.0 * n**3 / cpu / 1e12}


def gemm_tflops(dtype: str, device: str = "cpu", n: int = 2048, repeats: int = 3) -> float:
    """Best-of-`repeats` rate of a plain torch.mm of two n x n matrices in `dtype` (fp32 |
    bf16), in TFLOP/s: what this machine's matmul kernels reach right now, the ceiling the
    model's utilisation is measured against."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b)  # warm-up: kernel selection, page faults
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best / 1e12


# dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s, by a
# substring of torch.cuda.get_device_name; the first match wins (PCIe before the SXM default)
GPU_PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)


def gpu_peak_bf16_tflops(name: str) -> float | None:
    """The dense bf16 peak of the GPU called `name` (None when the table does not know it)."""
    return next((v for k, v in GPU_PEAK_BF16_TFLOPS if k in name), None)
