"""Data-parallel plumbing: device choice, DDP set-up from torchrun's env vars, collectives.

`setup(device_pref)` reads RANK / WORLD_SIZE / LOCAL_RANK (set by `torchrun`); with a world
size above one it starts a process group (gloo on CPU, nccl on CUDA). Without them it is a
single process and every collective below is the identity, so tasks can call them freely.

Across several nodes (one `torchrun` per node, docs/deploy.md) RANK is the global rank: it picks
the data share, the RNG state of a resumed run and the one writer of checkpoints, config and
metrics (rank 0); LOCAL_RANK, the rank within the node, only picks the GPU. Every collective
waits at most `$ECGPLAT_DIST_TIMEOUT_S` seconds (default 1800) for the other ranks, so a rank
whose peer node vanished without closing its sockets fails instead of hanging.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    """ "cuda" if asked for or ("auto" and available), else "cpu"."""
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda requested but CUDA is not available")
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if pref not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device '{pref}'")
    return torch.device("cpu")


def setup(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world,
            timeout=collective_timeout(),
        )
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device)


TIMEOUT_ENV = "ECGPLAT_DIST_TIMEOUT_S"


def collective_timeout() -> timedelta:
    """How long joining the group and each collective wait for the other ranks:
    `$ECGPLAT_DIST_TIMEOUT_S` seconds, 1800 (torch's default) when unset."""
    value = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < 1e9:  # NaN and infinity too
        raise ValueError(f"{TIMEOUT_ENV}={value!r}: expected a positive number of seconds")
    return timedelta(seconds=seconds)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum" | "max" | "min"); returns the tensor."""
    if is_distributed():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def all_reduce_floats(
    values: list[float], device: torch.device | str = "cpu", op: str = "sum"
) -> list[float]:
    """All-reduce a short list of python numbers (float64 on the wire)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    return all_reduce(t, op).tolist()


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of an equally-shaped tensor (no gradient), in rank order."""
    if not is_distributed():
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def limit_heap_growth(mmap_threshold: int = 128 * 1024) -> bool:
    """Serve allocations above `mmap_threshold` bytes from mmap (glibc `M_MMAP_THRESHOLD`).

    Activations of the paper-size model are many tensors of a few MB that glibc would otherwise
    keep in a fragmented heap: peak RSS of one CPU training step of 16 segments drops from
    ~3.8 GiB to ~3.2 GiB. No-op (False) where glibc is not the allocator.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(mmap_threshold)))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
