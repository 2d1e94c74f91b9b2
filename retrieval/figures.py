"""Figure files for retrieval's plots (CMC curves, query matches): pyplot on the Agg backend
and saving a finished figure as an image."""

from __future__ import annotations

import os
from pathlib import Path


def pyplot():
    """`matplotlib.pyplot` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: str | os.PathLike, dpi: int) -> Path:
    """Lay out `fig`, write it to `out` (parent folders created) and close it; returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    pyplot().close(fig)
    return out
