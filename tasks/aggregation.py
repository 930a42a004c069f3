"""Server-side step: aggregate the round's client updates into the next global adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedtune.adapters import load_state, save_state
from fedtune.config import FedConfig
from fedtune.server import aggregate_reports


@task(cache_policy=NO_CACHE, task_run_name="aggregate-r{round_}")
def aggregate(
    config: FedConfig,
    round_: int,
    global_path: str,
    server_state_path: str,
    reports: list[dict[str, Any]],
    out_dir: str,
) -> dict[str, str]:
    """Write the new global adapter and strategy state under `out_dir`; return their paths."""
    new_global, new_server = aggregate_reports(config, load_state(global_path), reports, load_state(server_state_path))
    out = Path(out_dir)
    paths = {"global_path": str(out / "global.safetensors"), "server_state_path": str(out / "server_state.safetensors")}
    save_state(new_global, paths["global_path"])
    save_state(new_server, paths["server_state_path"])
    return paths
