"""Continual-learning steps: the data a run trains on, the champion it starts from, and the decision."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fedtune.config.schema import FedConfig
from fedtune.data.partition import client_dir, split_path
from mlflow_tracking.lineage import dvc_md5
from mlflow_tracking.registry import aliased_version, download, promote
from mlflow_tracking.runs import RunTracker

FINAL_ADAPTER = "adapters/final"  # where the federated flow logs its final adapter


@task(cache_policy=NO_CACHE)
def data_versions(config: FedConfig) -> dict[str, str]:
    """The DVC md5 of the held-out test set and of every client's partition folder on this machine
    (a client whose data lives only in its own organization is not hashed here)."""
    root = config.data.partitions_dir
    folders = {f"client_{c}": client_dir(root, c) for c in range(config.data.partition.num_clients)}
    clients = {name: dvc_md5(folder) for name, folder in folders.items() if folder.exists()}
    return {"test": dvc_md5(split_path(root, None, "test")), **clients}


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3)
def fetch_champion(config: FedConfig, alias: str, dst: str) -> dict[str, str] | None:
    """The version `alias` names and its adapter folder, downloaded under `dst`; None before any promotion."""
    uri, name = config.tracking.tracking_uri, config.tracking.registered_model
    found = aliased_version(uri, name, alias)
    if found is None:
        get_run_logger().info("no %s@%s yet: starting from a fresh adapter", name, alias)
        return None
    get_run_logger().info("starting from %s version %s (%s@%s)", name, found.number, name, alias)
    return {"version": found.number, "run_id": found.run_id, "adapter": download(uri, found, dst)}


@task(cache_policy=NO_CACHE)
def settle(
    config: FedConfig, alias: str, summary: dict[str, Any], champion: dict[str, str] | None, versions: dict[str, str]
) -> dict[str, Any]:
    """Register the run's final adapter and move `alias` to it only if its test loss is below round 0's.

    Round 0 is the run's starting adapter (the champion, or a fresh adapter before the first
    promotion) scored by the same evaluator on today's held-out set, so both sides of the
    comparison see the same data. Lineage and the decision are tagged on the run either way.
    """
    run = RunTracker(summary["mlflow_run_id"], config.tracking.tracking_uri)
    start_loss = run.metric_history("test_loss")[0]
    promoted = summary["test_loss"] < start_loss
    lineage = {
        "lineage.parent_version": champion["version"] if champion else "none",
        "lineage.parent_run_id": champion["run_id"] if champion else "none",
        "lineage.rounds": str(summary["rounds"]),
        **{f"lineage.data.{key}": value for key, value in versions.items()},
    }
    run.set_tags(
        {
            **lineage,
            "continual.decision": "promoted" if promoted else "kept",
            "continual.start_test_loss": f"{start_loss:.6f}",
            "continual.test_loss": f"{summary['test_loss']:.6f}",
        }
    )
    version = None
    if promoted:
        tags = {
            **lineage,
            "config": config.fingerprint(),
            "test_loss": f"{summary['test_loss']:.6f}",
            "base_model": config.model.name_or_path,  # what a plain run's registration compares on
            "peft_method": config.peft.method,
        }
        version = promote(run, FINAL_ADAPTER, config.tracking.registered_model, alias, tags)
        run.set_tags({"continual.version": version})
    get_run_logger().info(
        "test loss %.4f vs %.4f at the start (%s): %s",
        summary["test_loss"],
        start_loss,
        f"version {champion['version']}" if champion else "fresh adapter",
        f"registered version {version} as {alias}" if promoted else f"{alias} unchanged",
    )
    return {
        "promoted": promoted,
        "version": version,
        "parent_version": champion["version"] if champion else None,
        "start_test_loss": start_loss,
        "test_loss": summary["test_loss"],
        "data_versions": versions,
        "mlflow_run_id": run.run_id,
    }
