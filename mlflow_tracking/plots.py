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


def plot_rounds(history: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    panels = [(key, title) for key, title in PANELS if any(key in row for row in history)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        rows = [row for row in history if key in row]
        ax.plot([row["round"] for row in rows], [row[key] for row in rows], marker="o")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
