"""`ecgplat explain`: which leads and moments of one ECG drove one output of a model.

Integrated Gradients (Sundararajan et al. 2017) from captum: the attribution of input sample
(lead l, time t) to output k is ``(x - x') * mean over the straight path from x' to x of
d f_k / d x``, for a baseline ``x'``; the attributions add up to ``f_k(x) - f_k(x')``
(completeness; the convergence delta reports the gap). ``f_k`` is the head's raw output (the
logit, or the standardised value of a regression), not the probability, whose saturation would
flatten the gradients.

The baseline. The encoder normalises each channel of its first convolution over time
(GroupNorm), so the model hardly sees amplitude: on the path from the flat line (zeros) to a
record its output changes almost entirely within the first 0.1 % of the way, where the signal is
microvolts and the normalisation's epsilon dominates. A zero baseline therefore explains how
the model reacts to an ECG fading in from silence. The default baseline is the record blurred in
time (``blur``: a moving average over ``blur_ms``, 100 ms, per lead; Sturmfels et al. 2020,
"Visualizing the impact of feature attribution baselines"): the path stays among ECG-like
amplitudes and the attribution shows which waveform detail finer than ~100 ms (QRS complexes,
P waves, spikes, notches) drove the output; slower content (T waves, baseline level) gets less.
``zeros`` is available; its path is sampled on an exponential schedule (``ZERO_SCHEDULE``) so
that captum's quadrature nodes fall where the output changes: the same integral (IG does not
depend on how the path is parametrised), with a convergence delta near zero instead of of the
order of the output.

Per lead, the share is the lead's sum of absolute attributions over the total. Outputs in
`out`: `explanation.json` (the shares and what was explained, no identifier and no path),
`attributions.npy` (float32 (12, 2500), per lead and time step) and `explanation.png` (the 12
leads in mV with the attribution overlaid, red where it raised the output, blue where it
lowered it; formats in docs/formats.md, "Explanations").
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecgplat.atomic import atomic_path
from ecgplat.leads import LEADS
from ecgplat.store.schema import SAMPLE_RATE
from training.models.deployable import Deployable, HeadGraph

FORMAT = "ecgplat-explanation/1"
DEFAULT_STEPS = 64
BASELINES = ("blur", "zeros")
BLUR_MS = 100.0
ZERO_SCHEDULE = 14.0  # zeros: path position (e^(k a) - 1) / (e^k - 1), from ~1e-6 of x up


class ExplainError(ValueError):
    """An explanation that cannot be made (one line naming the option or file)."""


@dataclass
class Attribution:
    values: np.ndarray  # float32 (12, T): attribution per lead and time step
    output: float  # f_k(x): the raw head output explained
    baseline_output: float  # f_k(x'), the baseline's output
    delta: float  # sum(values) - (output - baseline_output): completeness gap


def resolve_output(task: dict, class_name: str | None, output: int | None) -> int:
    """The output index for `--class NAME` (a class name, or for the CinC classes also its
    abbreviation; case-insensitive) or `--output K`; ExplainError naming the option."""
    classes = list(task["classes"])
    if (class_name is None) == (output is None):
        raise ExplainError("give one of --class NAME or --output K")
    if output is not None:
        if not 0 <= output < len(classes):
            raise ExplainError(f"--output {output}: the model has outputs 0..{len(classes) - 1}")
        return int(output)
    names = {c.lower(): i for i, c in enumerate(classes)}
    if (task.get("source") or {}).get("vocabulary") == "cinc26":
        from ecgplat.labels import ABBREVIATIONS

        names.update({a.lower(): i for i, a in enumerate(ABBREVIATIONS)})
    key = str(class_name).strip().lower()
    if key not in names:
        shown = ", ".join(classes[:8]) + (" ..." if len(classes) > 8 else "")
        raise ExplainError(f"--class {class_name}: not a class of task {task['name']} ({shown})")
    return names[key]


def baseline_of(signal: np.ndarray, baseline: str = "blur", blur_ms: float = BLUR_MS) -> np.ndarray:
    """The baseline (12, T) float32 of one segment: the flat line, or each lead's moving average
    over `blur_ms` (edges replicated)."""
    x = np.asarray(signal, dtype=np.float32)
    if baseline == "zeros":
        return np.zeros_like(x)
    if baseline != "blur":
        raise ExplainError(f"--baseline {baseline}: expected one of {', '.join(BASELINES)}")
    width = max(1, int(round(blur_ms * SAMPLE_RATE / 1000)))
    padded = np.pad(x, ((0, 0), (width // 2, width - 1 - width // 2)), mode="edge")
    csum = np.cumsum(np.pad(padded.astype(np.float64), ((0, 0), (1, 0))), axis=1)
    return ((csum[:, width:] - csum[:, :-width]) / width).astype(np.float32)


def integrated_gradients(
    graph: HeadGraph,
    signal: np.ndarray,
    lead_mask: np.ndarray,
    output: int,
    steps: int = DEFAULT_STEPS,
    baseline: str = "blur",
    blur_ms: float = BLUR_MS,
    internal_batch_size: int = 16,
) -> Attribution:
    """IG of head output `output` for one segment `signal` (12, T) float32 (already normalised
    as the model was trained) with `lead_mask` (12,) bool, against `baseline` (module
    docstring)."""
    from captum.attr import IntegratedGradients

    x = torch.as_tensor(np.asarray(signal, dtype=np.float32))[None]
    base = torch.as_tensor(baseline_of(signal, baseline, blur_ms))[None]
    mask = torch.as_tensor(np.asarray(lead_mask, dtype=bool))[None]
    diff = x - base
    safe = torch.where(diff == 0, torch.ones_like(diff), diff)
    k = ZERO_SCHEDULE if baseline == "zeros" else 0.0

    def head_output(inputs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if k:  # the point at path position a (= what captum feeds) moved to schedule(a)
            a = (inputs - base) / safe
            inputs = base + diff * torch.expm1(k * a) / math.expm1(k)
        return graph(inputs, masks)[0][:, output]

    requires = [p.requires_grad for p in graph.parameters()]
    graph.eval().requires_grad_(False)  # gradients w.r.t. the input only
    try:
        attr, delta = IntegratedGradients(head_output).attribute(
            x,
            baselines=base,
            additional_forward_args=(mask,),
            n_steps=steps,
            internal_batch_size=internal_batch_size,
            return_convergence_delta=True,
        )
        with torch.no_grad():
            fx = float(head_output(x, mask)[0])
            f0 = float(head_output(base, mask)[0])
    finally:
        for p, r in zip(graph.parameters(), requires, strict=True):
            p.requires_grad_(r)
    return Attribution(attr[0].detach().numpy().astype(np.float32), fx, f0, float(delta[0]))


def lead_shares(values: np.ndarray) -> np.ndarray:
    """Each lead's share (12,) of the total absolute attribution (zeros when it is all zero)."""
    per_lead = np.abs(np.asarray(values, dtype=np.float64)).sum(axis=-1)
    total = per_lead.sum()
    return per_lead / total if total > 0 else per_lead


def explain_record(
    dep: Deployable,
    segments_mv: np.ndarray,
    lead_mask: np.ndarray,
    out: str | os.PathLike,
    class_name: str | None = None,
    output: int | None = None,
    segment: int = 0,
    steps: int = DEFAULT_STEPS,
    baseline: str = "blur",
    blur_ms: float = BLUR_MS,
) -> dict[str, Any]:
    """Explain output `class_name` / `output` of `dep` on segment `segment` of a record
    (`segments_mv` (S, 12, 2500) mV, `lead_mask` (12,)); writes the three files of the module
    docstring to `out` and returns the JSON summary."""
    from training.normalize import normalize_record

    if not isinstance(dep.graph, HeadGraph) or dep.task is None:
        raise ExplainError(
            f"{dep.checkpoint}: a {dep.kind!r} checkpoint has no task head to explain "
            "(explain a diagnosis or fine-tuned task model)"
        )
    k = resolve_output(dep.task, class_name, output)
    n_seg = int(len(segments_mv))
    if not 0 <= segment < n_seg:
        raise ExplainError(f"--segment {segment}: the record has segments 0..{n_seg - 1}")
    if steps < 2:
        raise ExplainError(f"--steps {steps}: at least 2 integration steps are needed")
    mask = np.asarray(lead_mask, dtype=bool)
    x_mv = np.asarray(segments_mv, dtype=np.float32) * mask[None, :, None]
    x = normalize_record(x_mv, dep.normalize)[segment]  # statistics of the whole record
    attr = integrated_gradients(dep.graph, x, mask, k, steps, baseline, blur_ms)
    shares = lead_shares(attr.values)
    task = dep.task
    with torch.no_grad():
        _, score = dep.graph(torch.from_numpy(x)[None], torch.from_numpy(mask)[None])
    score_name = "value" if task["kind"] == "regression" else "probability"
    summary = {
        "format": FORMAT,
        "method": "integrated_gradients",
        "library": f"captum {_captum_version()}",
        "baseline": baseline if baseline == "zeros" else f"blur {blur_ms:g} ms",
        "steps": int(steps),
        "checkpoint_sha256": dep.sha256,
        "task": task["name"],
        "kind": task["kind"],
        "output": k,
        "class": task["classes"][k],
        "raw_output": attr.output,
        score_name: float(score[0, k]),
        "baseline_raw_output": attr.baseline_output,
        "convergence_delta": attr.delta,
        "segment": int(segment),
        "n_segments": n_seg,
        "normalization": dep.normalize,
        "leads_present": [LEADS[i] for i in np.flatnonzero(mask)],
        "lead_shares": {lead: float(s) for lead, s in zip(LEADS, shares, strict=True)},
        "top_lead": LEADS[int(np.argmax(shares))],
        "files": {"plot": "explanation.png", "attributions": "attributions.npy"},
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "attributions.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, attr.values)
    title = f"{task['name']}: {task['classes'][k]} ({score_name} {float(score[0, k]):.3f})"
    plot_attribution(x_mv[segment], attr.values, mask, shares, title, out / "explanation.png")
    with atomic_path(out / "explanation.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, allow_nan=False))
    return summary


def plot_attribution(
    signal_mv: np.ndarray,
    values: np.ndarray,
    lead_mask: np.ndarray,
    shares: np.ndarray,
    title: str,
    path: Path,
    smooth_ms: float = 20.0,
) -> None:
    """The 12 leads (6 x 2, limb leads left, chest leads right) in mV, each over a band of its
    attribution (moving average over `smooth_ms` for display; one colour scale for all)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = max(1, int(round(smooth_ms * SAMPLE_RATE / 1000)))
    kernel = np.ones(width) / width
    shown = np.stack([np.convolve(v, kernel, mode="same") for v in values])
    scale = float(np.abs(shown).max()) or 1.0
    t_end = signal_mv.shape[-1] / SAMPLE_RATE
    fig = Figure(figsize=(14, 10), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(6, 2, sharex=True)
    for i, lead in enumerate(LEADS):
        ax = axes[i % 6, i // 6]
        lo, hi = float(signal_mv[i].min()), float(signal_mv[i].max())
        pad = max(0.1, 0.1 * (hi - lo))
        lo, hi = lo - pad, hi + pad
        ax.imshow(
            shown[i][None, :],
            extent=(0.0, t_end, lo, hi),
            aspect="auto",
            cmap="RdBu_r",
            vmin=-scale,
            vmax=scale,
            alpha=0.75,
            interpolation="nearest",
        )
        t = np.arange(signal_mv.shape[-1]) / SAMPLE_RATE
        ax.plot(t, signal_mv[i], color="black", lw=0.6)
        label = f"{lead}  {shares[i]:.0%}" if lead_mask[i] else f"{lead}  (absent)"
        ax.set_title(label, loc="left", fontsize=9, pad=2)
        ax.set_ylim(lo, hi)
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("s")
    fig.suptitle(f"{title}: Integrated Gradients, share of attribution per lead", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _captum_version() -> str:
    import captum

    return str(getattr(captum, "__version__", "?"))
