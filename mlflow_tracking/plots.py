"""The per-round metrics plot logged with every run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    ("test_loss", "global test loss"),
    ("val_loss", "mean client val loss"),
    ("test_accuracy", "test exact match"),
]


PANEL_IN, HEIGHT_IN = 4.5, 3.2  # each panel's width and the figure's height, inches
MARGINS_IN = {"left": 0.75, "right": 0.15, "bottom": 0.5, "top": 0.35}  # room for ticks, labels, titles


def plot_rounds(history: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """A PNG of the metrics in PANELS against the round, one panel each (those `history` has).
    Logged after every round, so the layout is fixed (margins in inches) instead of
    `tight_layout`, which measured every label again and took 40% of each plot's 0.15 CPU-s."""
    panels = [(key, title) for key, title in PANELS if any(key in row for row in history)]
    if not panels:
        return None
    width = PANEL_IN * len(panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, HEIGHT_IN), squeeze=False)
    fig.subplots_adjust(
        left=MARGINS_IN["left"] / width,
        right=1 - MARGINS_IN["right"] / width,
        bottom=MARGINS_IN["bottom"] / HEIGHT_IN,
        top=1 - MARGINS_IN["top"] / HEIGHT_IN,
        wspace=0.25,
    )
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        rows = [row for row in history if key in row]
        ax.plot([row["round"] for row in rows], [row[key] for row in rows], marker="o")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
