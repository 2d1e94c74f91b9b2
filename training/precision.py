"""The numeric precision a model runs in: `auto` resolved per device, and its autocast context.

`auto` picks bf16 where the hardware computes it natively (CUDA devices that support bf16; CPUs
with AMX tiles or AVX-512-BF16) and fp32 elsewhere, so that a CPU that would only emulate bf16
never gets slower. The environment variable ECGPLAT_CPU_BF16 (`1` / `0`) overrides the CPU
capability probe (tests use it to exercise both answers on any machine).
"""

from __future__ import annotations

import contextlib
import os

import torch

PRECISIONS = ("auto", "fp32", "bf16")
CPU_BF16_ENV = "ECGPLAT_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AMX or AVX-512-BF16), or when
    ECGPLAT_CPU_BF16 says so."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(f"{CPU_BF16_ENV}={forced!r}: expected 0 or 1")
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in probes)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """ "auto" | "fp32" | "bf16" on `device` -> "fp32" | "bf16" (explicit choices are kept)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if kind == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def autocast(precision: str, device: torch.device | str):
    """The context a forward pass runs in: bf16 autocast on `device`'s type, or a no-op for fp32
    (`precision` may be "auto": it is resolved first)."""
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
