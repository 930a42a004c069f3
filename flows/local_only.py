"""Baseline: every client trains alone on its own data, with the federation's step budget.

Each client's adapter gets R x steps_per_round steps (what that client trains in the
federation), starts from the same round-0 adapter, and is evaluated like the global one.
"""

from __future__ import annotations

import time
from pathlib import Path
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


def _alone(config: FedConfig, run: Path, run_id: str, client: int) -> dict[str, Any]:
    """One client's own adapter, trained for its federated step budget and evaluated."""
    n_train = len(read_split(config.data.partitions_dir, client, "train"))
    steps = total_steps(config.train, n_train, config.federation.rounds)
    path = str(run / f"client_{client}.safetensors")
    report = standalone_train(
        config, f"client-{client}", [client], steps, config.train.batch_size, config.train.seed + client, path
    )
    # its adapter on every client's val split is logged once as val_loss (their mean), not as
    # client_<k>/global_val_loss under this client's prefix (client_0/client_1/...)
    metrics = {k: v for k, v in evaluate(config, path, f"client-{client}").items() if not k.startswith("client_")}
    log_adapter(config, run_id, path, f"adapters/client_{client}")
    return {"client": client, **metrics, **{k: report[k] for k in ("steps", "train_loss", "seconds")}}


@flow(name="local-only")
def local_only(
    config: FedConfig = FedConfig(),  # noqa: B008 (Prefect shows the defaults in the run form)
    prepare_data: bool = True,
    output_dir: str = "outputs/local_only",
) -> dict[str, Any]:
    logger = get_run_logger()
    started = time.perf_counter()
    run, run_id = open_run(config, "local_only", output_dir, prepare_data=prepare_data)
    with failing_run(config, run_id):
        rows = [_alone(config, run, run_id, client) for client in range(config.data.partition.num_clients)]
    mean: dict[str, Any] = {
        key: sum(r[key] for r in rows) / len(rows)
        for key in rows[0]
        if (key.startswith("test_") or key == "val_loss") and "/" not in key and all(key in r for r in rows)
    }
    log_round(config, run_id, config.federation.rounds, mean, rows, [])
    summary: dict[str, Any] = {
        "method": "local_only",
        **mean,
        "test_accuracy_per_client": [r.get("test_accuracy") for r in rows],
        "bytes_per_round": 0,
        "bytes_total": 0,
        "share_of_full_finetuning": 0.0,
        "wall_seconds": time.perf_counter() - started,
        "mlflow_run_id": run_id,
    }
    finish_tracking(config, run_id, summary)
    write_outputs(run, summary, rows)
    logger.info(
        "local-only: mean test accuracy %s, per client %s",
        mean.get("test_accuracy"),
        summary["test_accuracy_per_client"],
    )
    return summary
