"""The 12 standard ECG leads: canonical names and order, name normalisation, lead-subset presets.

Canonical order is I, II, III, aVR, aVL, aVF, V1..V6 (the PhysioNet 2021 file order). Channel
names found in files are matched case-insensitively (``i``, ``AVR``, ``avl``, ``v1``); a few
well-known aliases map onto a standard lead (MIT-BIH's modified limb lead ``MLII`` -> II, ``MLI``
-> I, ``MLIII`` -> III). Anything else — Frank leads ``vx vy vz``, ``pleth``, ``ABP``, ``resp``,
and ambiguous labels such as a bare ``ECG`` — gives ``None``: an unknown channel is dropped, never
guessed into a lead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")

_LOOKUP: dict[str, str] = {name.lower(): name for name in LEADS}
# Modified limb leads of Holter-style recordings (MIT-BIH) record the same projection.
_LOOKUP.update({"mli": "I", "mlii": "II", "mliii": "III"})

LEAD_PRESETS: dict[str, tuple[str, ...]] = {
    "12": LEADS,
    "6": ("I", "II", "III", "aVR", "aVL", "aVF"),
    "4": ("I", "II", "III", "V2"),
    "3": ("I", "II", "V2"),
    "2": ("I", "II"),
    "1": ("I",),
}


def canonical_lead(name: str) -> str | None:
    """The canonical spelling of a lead name (case-insensitive), or None for a non-ECG channel."""
    return _LOOKUP.get(str(name).strip().lower())


def parse_leads(spec: str | Sequence[str] | Sequence[int]) -> tuple[int, ...]:
    """Lead indices (sorted, canonical order) from a preset name ("12", "6", ...), a comma list
    ("I,II,V2") or a sequence of names or indices. Raises ValueError naming the bad lead."""
    if isinstance(spec, str):
        text = spec.strip()
        if text in LEAD_PRESETS:
            items: list = list(LEAD_PRESETS[text])
        else:
            items = [t for t in text.strip("[]").split(",") if t.strip()]
    else:
        items = list(spec)
    if not items:
        raise ValueError(f"empty lead selection: {spec!r}")
    out: set[int] = set()
    for item in items:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not 0 <= int(item) < len(LEADS):
                raise ValueError(f"lead index out of range 0..11: {item}")
            out.add(int(item))
            continue
        name = canonical_lead(item)
        if name is None:
            raise ValueError(
                f"unknown lead {str(item).strip()!r} (expected one of {', '.join(LEADS)})"
            )
        out.add(LEADS.index(name))
    return tuple(sorted(out))


def lead_mask(indices: Sequence[int]) -> np.ndarray:
    """bool (12,) with True at the given lead indices."""
    mask = np.zeros(len(LEADS), dtype=bool)
    mask[list(indices)] = True
    return mask


def apply_lead_subset(x, indices: Sequence[int]):
    """A copy of ``x`` (numpy array or torch tensor of shape (..., 12, T)) with every lead not in
    ``indices`` set to zero."""
    if x.shape[-2] != len(LEADS):
        raise ValueError(f"expected 12 leads on axis -2, got shape {tuple(x.shape)}")
    keep = lead_mask(indices)
    if isinstance(x, np.ndarray):
        out = x.copy()
        out[..., ~keep, :] = 0
        return out
    import torch  # only torch inputs reach here

    out = x.clone()
    out[..., torch.as_tensor(~keep, device=x.device), :] = 0
    return out
