"""Client-side steps: one client's local training round, and a standalone (baseline) training."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fedtune.config.schema import FedConfig
from fedtune.round.client import train_client
from fedtune.training.baselines import train_standalone


@task(cache_policy=NO_CACHE, task_run_name="train-r{round_}-c{client}")
def local_train(
    config: FedConfig,
    client: int,
    round_: int,
    global_path: str,
    update_path: str,
    private_dir: str,
    server_view_path: str | None = None,
) -> dict[str, Any]:
    """Train from the global adapter on this client's data; only the update file leaves."""
    report = train_client(
        config,
        client=client,
        round_=round_,
        global_path=global_path,
        update_path=update_path,
        private_dir=private_dir,
        server_view_path=server_view_path,
    ).row()
    get_run_logger().info(
        "round %d client %d: loss %.3f -> %.3f, val %s, %d B up, %.1f s",
        round_,
        client,
        report["train_loss_first"],
        report["train_loss_last"],
        report.get("val_loss", "none"),
        report["bytes_up"],
        report["seconds"],
    )
    return report


@task(cache_policy=NO_CACHE, task_run_name="train-{name}")
def standalone_train(
    config: FedConfig, name: str, clients: list[int], steps: int, batch_size: int, seed: int, adapter_path: str
) -> dict[str, Any]:
    """Train one adapter on the pooled train splits of `clients` (a baseline)."""
    report = train_standalone(
        config, clients=clients, steps=steps, batch_size=batch_size, seed=seed, adapter_path=adapter_path
    )
    get_run_logger().info(
        "%s: %d steps, loss %.3f -> %.3f", name, steps, report["train_loss_first"], report["train_loss_last"]
    )
    return report
