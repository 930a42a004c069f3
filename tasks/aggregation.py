"""Server-side step: aggregate the round's client updates into the next global adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fedtune.config.schema import FedConfig
from fedtune.core.faults import crash_point
from fedtune.deployment.exchange import coordinator_exchange
from fedtune.model.adapters import load_state, save_state
from fedtune.privacy.secagg.remote import RemoteRound
from fedtune.round.secure_round import secure_aggregate
from fedtune.round.server import aggregate_reports, state_metrics
from fedtune.round.server import round_allowed as allowed
from fedtune.strategies.options import build_strategy


@task(cache_policy=NO_CACHE, task_run_name="aggregate-r{round_}")
def aggregate(
    config: FedConfig,
    round_: int,
    global_path: str,
    server_state_path: str,
    reports: list[dict[str, Any]],
    out_dir: str,
    dropped: list[str],
    namespace: str | None = None,
) -> dict[str, Any]:
    """Validate and aggregate, or with `secagg.enabled` aggregate behind secure aggregation (updates
    leave the clients only as protocol messages); write the new global adapter and strategy state
    under `out_dir`. Returns their paths, the reasons of the clients left out (failed or
    rejected), the strategy's state metrics and, with secure aggregation, the protocol bytes.

    `namespace`: the deployed round's folder in the exchange, where the clients run their side of
    secure aggregation; None when they are simulated here."""
    global_state, server_state = load_state(global_path), load_state(server_state_path)
    extra: dict[str, Any] = {}
    if config.secagg.enabled:
        remote = None
        if namespace is not None:
            remote = RemoteRound(coordinator_exchange(config.deployment), namespace, config.deployment.poll_s)
        new_global, new_server, left_out, extra["protocol_bytes_up"] = secure_aggregate(
            config, round_, global_state, server_state, reports, dropped, remote
        )
    else:
        new_global, new_server, left_out = aggregate_reports(
            config, round_, global_state, reports, server_state, dropped
        )
    out = Path(out_dir)
    save_state(new_global, out / "global.safetensors")
    crash_point("aggregation", round_)  # the new global written, its server state not yet
    save_state(new_server, out / "server_state.safetensors")
    for reason in left_out:
        get_run_logger().warning("round %d: left out %s", round_, reason)
    return {
        "global_path": str(out / "global.safetensors"),
        "server_state_path": str(out / "server_state.safetensors"),
        "left_out": left_out,
        "state_metrics": state_metrics(config, new_server),
        **extra,
    }


@task(cache_policy=NO_CACHE, task_run_name="round-allowed-r{round_}")
def round_allowed(config: FedConfig, round_: int, server_state_path: str) -> bool:
    """Whether round `round_` may run (a privacy budget can forbid it)."""
    return allowed(config, load_state(server_state_path))


@task(cache_policy=NO_CACHE)
def share_view(config: FedConfig, server_state_path: str, out_dir: str) -> str:
    """Write what the strategy lets clients see of its server state (often nothing; SCAFFOLD's
    control variate) next to the round's files; clients never read the server state itself."""
    path = Path(out_dir) / "server_view.safetensors"
    save_state(build_strategy(config).client_view(load_state(server_state_path)), path)
    return str(path)
