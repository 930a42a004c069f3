"""Baseline: one adapter on the pooled data of all clients (what federation approximates).

Same number of optimizer steps as each federated client (R x steps_per_round), with a
K times larger batch, so it sees as many examples as the whole federation.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger

from fedtune.config.schema import FedConfig
from fedtune.data.partition import read_split
from fedtune.round.outputs import write_outputs
from fedtune.training.loop import total_steps
from flows.common import failing_run, open_run
from tasks.evaluation import evaluate
from tasks.tracking import finish_tracking, log_adapter, log_round
from tasks.training import standalone_train


@flow(name="centralized")
def centralized(
    config: FedConfig = FedConfig(),  # noqa: B008 (Prefect shows the defaults in the run form)
    prepare_data: bool = True,
    output_dir: str = "outputs/centralized",
) -> dict[str, Any]:
    logger = get_run_logger()
    started = time.perf_counter()
    run, run_id = open_run(config, "centralized", output_dir, prepare_data=prepare_data)
    clients = list(range(config.data.partition.num_clients))
    n_train = sum(len(read_split(config.data.partitions_dir, c, "train")) for c in clients)
    k = config.federation.clients_per_round
    steps = total_steps(config.train, n_train // k, config.federation.rounds)
    path = str(run / "adapter.safetensors")
    with failing_run(config, run_id):
        report = standalone_train(
            config, "pooled", clients, steps, config.train.batch_size * k, config.train.seed, path
        )
        metrics = evaluate(config, path, "centralized")
    log_round(config, run_id, config.federation.rounds, {**metrics, "train_loss": report["train_loss"]}, [], [])
    artifact = log_adapter(config, run_id, path, "adapters/final")
    summary: dict[str, Any] = {
        "method": "centralized",
        **{key: metrics[key] for key in ("test_loss", "test_accuracy", "val_loss") if key in metrics},
        "bytes_per_round": 0,
        "bytes_total": 0,
        "share_of_full_finetuning": 0.0,
        "steps": report["steps"],
        "wall_seconds": time.perf_counter() - started,
        "mlflow_run_id": run_id,
        "adapter_artifact": artifact,
    }
    finish_tracking(config, run_id, summary)
    write_outputs(run, summary, [{"round": config.federation.rounds, **metrics}])
    logger.info("centralized: test accuracy %s", summary.get("test_accuracy"))
    return summary
