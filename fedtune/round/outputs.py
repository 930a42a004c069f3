"""Final outputs of a flow (DVC `metrics` and `plots` files), written atomically and last.

They are removed when a run starts, so an interrupted run never leaves a complete-looking
`metrics.json` from an earlier one.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from fedtune.core.atomic import atomic_write_bytes

METRICS_FILE = "metrics.json"
ROUNDS_FILE = "rounds.csv"


def clear_outputs(run_dir: str | Path) -> None:
    for name in (METRICS_FILE, ROUNDS_FILE):
        (Path(run_dir) / name).unlink(missing_ok=True)


def write_outputs(run_dir: str | Path, summary: dict[str, Any], history: list[dict[str, Any]]) -> None:
    run_dir = Path(run_dir)
    if history:
        columns = sorted({key for row in history for key in row if isinstance(row[key], int | float)})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
        atomic_write_bytes(buffer.getvalue().encode(), run_dir / ROUNDS_FILE)
    atomic_write_bytes(json.dumps(summary, indent=2, sort_keys=True).encode(), run_dir / METRICS_FILE)
