"""Server-side step: aggregate the round's client updates into the next global adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fedtune.adapters import AdapterState, load_state, save_state
from fedtune.config import FedConfig
from fedtune.secure_round import secure_aggregate
from fedtune.server import aggregate_reports, state_metrics
from fedtune.server import round_allowed as allowed
from fedtune.strategies import ServerState


def _written(
    round_: int,
    out_dir: str,
    new_global: AdapterState,
    new_server: ServerState,
    left_out: list[str],
    **extra: Any,
) -> dict[str, Any]:
    """Write the round's global adapter and strategy state; report their paths and who was left out."""
    out = Path(out_dir)
    save_state(new_global, out / "global.safetensors")
    save_state(new_server, out / "server_state.safetensors")
    for reason in left_out:
        get_run_logger().warning("round %d: left out %s", round_, reason)
    return {
        "global_path": str(out / "global.safetensors"),
        "server_state_path": str(out / "server_state.safetensors"),
        "left_out": left_out,
        **extra,
    }


@task(cache_policy=NO_CACHE, task_run_name="aggregate-r{round_}")
def aggregate(
    config: FedConfig,
    round_: int,
    global_path: str,
    server_state_path: str,
    reports: list[dict[str, Any]],
    out_dir: str,
    dropped: list[str],
) -> dict[str, Any]:
    """Validate and aggregate; write the new global adapter and strategy state under `out_dir`.

    Returns their paths and the reasons of the clients left out (failed or rejected).
    """
    new_global, new_server, left_out = aggregate_reports(
        config, round_, load_state(global_path), reports, load_state(server_state_path), dropped
    )
    return _written(round_, out_dir, new_global, new_server, left_out, state_metrics=state_metrics(config, new_server))


@task(cache_policy=NO_CACHE, task_run_name="secure-aggregate-r{round_}")
def secure_aggregate_task(
    config: FedConfig,
    round_: int,
    global_path: str,
    server_state_path: str,
    reports: list[dict[str, Any]],
    out_dir: str,
    dropped: list[str],
) -> dict[str, Any]:
    """Aggregate behind secure aggregation: updates leave the clients only as protocol messages."""
    new_global, new_server, left_out, protocol_bytes = secure_aggregate(
        config, round_, load_state(global_path), load_state(server_state_path), reports, dropped
    )
    return _written(
        round_,
        out_dir,
        new_global,
        new_server,
        left_out,
        state_metrics=state_metrics(config, new_server),
        protocol_bytes_up=protocol_bytes,
    )


@task(cache_policy=NO_CACHE, task_run_name="round-allowed-r{round_}")
def round_allowed(config: FedConfig, round_: int, server_state_path: str) -> bool:
    """Whether round `round_` may run (a privacy budget can forbid it)."""
    return allowed(config, load_state(server_state_path))
