"""What a person sees of a federated run in the Prefect UI: a progress bar over its rounds, one
summary line per round in the log, the round-by-round results as a table artifact, and the way to
its MLflow run (the MLflow run carries the flow run's id and UI address the other way)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from fedtune.config.schema import FedConfig
from mlflow_tracking.runs import RunTracker


@contextmanager
def best_effort(what: str) -> Iterator[None]:
    """A failed artifact write (the Prefect or MLflow API briefly away) is a warning: the run's
    results are already checkpointed and tracked, and the UI aid is not worth failing it for."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 (any failure of a UI aid is only reported)
        get_run_logger().warning("could not publish the %s to the Prefect UI: %s", what, error)


COLUMNS = ("round", "test_accuracy", "test_loss", "clients_aggregated", "bytes_up", "bytes_down", "round_seconds")


def start_progress(done: int, rounds: int) -> str | None:
    """The run's progress artifact (percent of its rounds completed); its id, for `advance`."""
    with best_effort("progress bar"):
        return str(create_progress_artifact(100.0 * done / rounds, key="federated-progress", description="rounds done"))
    return None


def advance(progress_id: str, row: dict[str, Any], rounds: int) -> None:
    """Move the progress bar to `row`'s round and log the round's one summary line."""
    done = row["round"]
    with best_effort("progress bar"):
        update_progress_artifact(UUID(progress_id), 100.0 * done / rounds, description=f"round {done} of {rounds} done")
    accuracy = "-" if row.get("test_accuracy") is None else f"{row['test_accuracy']:.3f}"
    loss = "-" if row.get("test_loss") is None else f"{row['test_loss']:.4f}"
    get_run_logger().info(
        "round %d/%d: test accuracy %s, test loss %s, %s clients aggregated, %s bytes up, %.0f s",
        done,
        rounds,
        accuracy,
        loss,
        row.get("clients_aggregated", "-"),
        f"{row.get('bytes_up', 0):,}",
        row.get("round_seconds", 0.0),
    )


def publish(config: FedConfig, history: list[dict[str, Any]], run_id: str) -> None:
    """The results table (one row per round, round 0 = the starting adapter) and the MLflow run:
    a link where MLflow serves a UI, else how to open the local store."""
    rows = [{column: row.get(column) for column in COLUMNS} for row in history]
    with best_effort("rounds table"):
        create_table_artifact(rows, key="federated-rounds", description="the global adapter after each round")
    uri = config.tracking.tracking_uri
    with best_effort("MLflow link"):
        url = RunTracker(run_id, uri).ui_url()
        if url is not None:
            create_link_artifact(url, link_text=f"MLflow run {run_id}", key="mlflow-run")
        else:
            create_markdown_artifact(
                f"MLflow run `{run_id}` (experiment `{config.tracking.experiment}`) in `{uri}`: "
                f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000",
                key="mlflow-run",
            )
