"""What the benchmark scripts share: a scratch config with its data ready, and result files."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from fedtune.config.schema import FedConfig, load_config
from fedtune.data.loading import load_records
from fedtune.model.loading import ensure_model
from fedtune.training.tokenized import partition_records

RESULTS = Path(__file__).parent / "results"
# a benchmark's temporary Prefect server must not phone home (`make` sets this too)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def scratch_overrides(root: Path) -> list[str]:
    """Overrides that send every file a run writes (data, outputs, MLflow store) under `root`."""
    return [
        f"data.partitions_dir={root}/partitions",
        f"data.processed_path={root}/data.jsonl",
        f"federation.output_dir={root}/federated",
        f"tracking.tracking_uri=sqlite:///{root}/mlflow.db",
        f"tracking.artifact_location={root}/mlartifacts",
    ]


def prepared_config(root: Path, overrides: list[str]) -> FedConfig:
    """params.yaml with the scratch paths and `overrides`; the model and partitions made ready."""
    config = load_config("params.yaml", [*scratch_overrides(root), *overrides])
    ensure_model(config.model)
    partition_records(config, load_records(config.data))
    return config


def evaluation_seconds(output_dir: str | Path) -> tuple[float, list[dict[str, str]]]:
    """Seconds a finished federated run spent evaluating (all rounds), and its round rows."""
    with (Path(output_dir) / "rounds.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return sum(float(row["eval_seconds"]) for row in rows), rows


def save_results(name: str, data: Any) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path
