"""Optional `torch.compile` of a model for a run: the `compile=auto|on|off` choice, the `auto`
policy, and the fall-back to eager execution, with one warning, where compilation fails.

What is compiled: the forward of every transformer layer (`TransformerLayer.forward`, in
place, so state dicts and checkpoints keep their keys). All layers of a model share one
compiled graph, so the compile cost does not grow with the depth; AOTAutograd compiles the
backward with it. The convolutional front end, the heads and the losses stay eager (their
`.item()` calls and the NumPy mask drawing would break the graph anyway).

`auto` compiles only where it was measured faster without raising the peak RSS (`AUTO_WHERE`,
docs/benchmarks.md "torch.compile"; no (device, precision) qualifies yet), for a model at least
as large as the `small` preset, and a run planned for at least `AUTO_MIN_UPDATES` updates (or
with no limit): compiling the paper preset's layer takes ~15 s (warm machine) to minutes (loaded
2-core CPU) and saves under a second per update, so the `tiny` preset and short runs stay eager.
Inductor's on-disk cache makes a repeated run's compile cheaper, not free. Inductor keys that
cache by the CPU, not by ATen's or oneDNN's kernel settings: code cached natively fails to build
under `ATEN_CPU_CAPABILITY=default` or `avx2`, so a run under such a setting uses a cache folder
of its own (`kernel_scoped_cache`) unless `TORCHINDUCTOR_CACHE_DIR` names one.

Compiled dropout draws its random numbers with inductor's own generator: the same
distribution, not the same masks as an eager run from the same seed.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable

import torch
from torch import nn

COMPILE_CHOICES = ("auto", "on", "off")
# (device type, precision) where the compiled layers measured faster than eager without a higher
# peak RSS (docs/benchmarks.md, "torch.compile"). Empty for now: on the 2-core AVX512-BF16 CPU
# bf16 steps were 1.12x faster but peaked 0.5 GiB higher (fp32: 1.05x, +1 GiB); no GPU yet.
AUTO_WHERE: frozenset[tuple[str, str]] = frozenset()
AUTO_MIN_UPDATES = 500  # break-even of a paper-preset CPU run is ~100-200 updates: margin
AUTO_MIN_LAYER_WIDTH = 512  # `small` and `paper` (768) qualify, `tiny` (64) does not

log = logging.getLogger(__name__)


class CompileFallback(UserWarning):
    """torch.compile failed; the model runs eagerly (warned once per process)."""


_warned = False


def _reason(error: BaseException) -> str:
    """`Type: first line` of the innermost cause (dynamo wraps the backend's own error)."""
    seen = {id(error)}
    while (inner := error.__cause__ or getattr(error, "inner_exception", None)) is not None:
        if id(inner) in seen:
            break
        seen.add(id(inner))
        error = inner
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first}"


def _warn_once(what: str, error: BaseException) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"compile: torch.compile of {what} failed ({_reason(error)}); running eagerly",
            CompileFallback,
            stacklevel=3,
        )


def layer_width(model: nn.Module) -> int:
    """The width of `model`'s transformer layers (0 when it has none)."""
    from training.models.transformer import TransformerLayer

    layer = next((m for m in model.modules() if isinstance(m, TransformerLayer)), None)
    return 0 if layer is None else int(layer.fc1.in_features)


def decide(
    choice: str,
    model: nn.Module,
    device: torch.device | str,
    precision: str,
    planned_updates: int | None,
) -> bool:
    """Whether to compile `model`'s layers: `on` / `off` as asked; `auto` per the module
    docstring's policy. `precision` is the resolved one (fp32 | bf16); `planned_updates`
    None = no update limit known (a run that stops on epochs it cannot count, or patience)."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"unknown compile choice {choice!r}; choose one of auto, on, off")
    if choice != "auto":
        return choice == "on"
    if (torch.device(device).type, precision) not in AUTO_WHERE:
        return False
    long_run = planned_updates is None or planned_updates >= AUTO_MIN_UPDATES
    return layer_width(model) >= AUTO_MIN_LAYER_WIDTH and long_run


class _CompiledOrEager:
    """Calls the compiled forward; if that raises and the eager forward then succeeds, the
    failure was the compiler's: warn once and stay eager from then on. An error the eager
    forward raises too is the caller's, and propagates unchanged."""

    def __init__(self, compiled: Callable, eager: Callable, what: str):
        self.compiled, self.eager, self.what = compiled, eager, what
        self.failed = False

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - classified by the eager rerun below
            out = self.eager(*args, **kwargs)
            self.failed = True
            _warn_once(self.what, error)
            log.info("compile failure of %s", self.what, exc_info=error)
            return out


KERNEL_SETTINGS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def kernel_scoped_cache() -> None:
    """Point inductor at a cache folder of the kernel settings in force (see module docstring);
    nothing when none is set or the user chose a folder."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    tags = [f"{k}-{os.environ[k]}" for k in KERNEL_SETTINGS if os.environ.get(k)]
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # torch itself writes its default into the variable once any part of it asked for the cache
    if not tags or (chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir())):
        return
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", "_".join(tags))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default_cache_dir(), tag)


def compile_layers(model: nn.Module, *, backend: str | Callable = "inductor") -> int:
    """Compile the forward of every transformer layer of `model` in place (see module
    docstring); returns how many layers were wrapped (0 when the model has none). Each layer's
    `forward` becomes a guarded callable: the first compile failure falls back to eager for
    every layer, with one warning."""
    from training.models.transformer import TransformerLayer

    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    if not layers:
        return 0
    kernel_scoped_cache()
    compiled = torch.compile(TransformerLayer.forward, backend=backend, dynamic=False)
    shared = _CompiledOrEager(compiled, TransformerLayer.forward, "the transformer layers")
    for layer in layers:
        setattr(layer, "forward", _BoundGuard(shared, layer))  # noqa: B010 - an instance attribute
    return len(layers)


def uncompile_layers(model: nn.Module) -> None:
    """Undo `compile_layers` (the layers' class forward again)."""
    from training.models.transformer import TransformerLayer

    for m in model.modules():
        if isinstance(m, TransformerLayer) and isinstance(m.__dict__.get("forward"), _BoundGuard):
            del m.forward


def is_compiled(model: nn.Module) -> bool:
    """True when `compile_layers` wrapped `model`'s layers and they have not fallen back."""
    return any(
        isinstance(g := m.__dict__.get("forward"), _BoundGuard) and not g.shared.failed
        for m in model.modules()
    )


class _BoundGuard:
    """`layer.forward`: the shared guard called with the layer as `self`."""

    def __init__(self, shared: _CompiledOrEager, layer: nn.Module):
        self.shared, self.layer = shared, layer

    def __call__(self, *args, **kwargs):
        return self.shared(self.layer, *args, **kwargs)
