"""Figures, saved as PNG with matplotlib's headless backend (no display needed)."""

from __future__ import annotations

from pathlib import Path

from scratchlm.io import atomic_write


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=dpi)
    pyplot().close(fig)
    return path
