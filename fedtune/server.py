"""The aggregator's part of a round: combine client updates with the configured strategy."""

from __future__ import annotations

from typing import Any

from fedtune.adapters import AdapterState, load_state
from fedtune.config import FedConfig
from fedtune.strategies import ClientUpdate, ServerState, build_strategy


def aggregate_reports(
    cfg: FedConfig, global_state: AdapterState, reports: list[dict[str, Any]], server_state: ServerState
) -> tuple[AdapterState, ServerState]:
    if not reports:
        raise ValueError("no client updates to aggregate")
    updates = [ClientUpdate(r["client"], load_state(r["update_path"]), r["num_examples"]) for r in reports]
    return build_strategy(cfg.federation).aggregate(global_state, updates, server_state)
