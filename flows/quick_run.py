"""The short form for the Prefect UI: the fields people change most, each described, applied to
the served params.yaml (the `federated-finetune` deployment keeps the full typed form)."""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow
from pydantic import Field

from fedtune.config.schema import choices, load_config
from fedtune.core.catalog import PEFT_METHODS, STRATEGIES
from flows.federated_finetune import federated_finetune


@flow(name="quick-run")
def quick_run(
    rounds: Annotated[int, Field(ge=1)] = 3,
    clients_per_round: Annotated[int, Field(ge=1)] = 3,
    strategy: Annotated[str, Field(json_schema_extra=choices(STRATEGIES))] = "fedavg",
    learning_rate: Annotated[float, Field(gt=0)] = 0.002,
    steps_per_round: Annotated[int, Field(ge=1)] = 10,
    peft_method: Annotated[str, Field(json_schema_extra=choices(PEFT_METHODS))] = "lora",
    params: str = "params.yaml",
) -> dict[str, Any]:
    """A simulated federation of `params` with this form's fields in place of its own.

    Args:
        rounds: Federated rounds; each samples clients, trains them, aggregates and evaluates.
        clients_per_round: Clients sampled each round, at most data.partition.num_clients.
        strategy: How the server aggregates the clients' updates (FedAvg, FedProx, SCAFFOLD, ...).
        learning_rate: Each client's AdamW learning rate (train.lr).
        steps_per_round: Optimizer steps each client takes per round (train.steps_per_round).
        peft_method: The adapter the clients train (peft.method).
        params: The config file, relative to where `fedtune serve` runs, that the fields above override.
    """
    config = load_config(
        params,
        [
            f"federation.rounds={rounds}",
            f"federation.clients_per_round={clients_per_round}",
            f"federation.strategy={strategy}",
            f"train.lr={learning_rate}",
            f"train.steps_per_round={steps_per_round}",
            f"peft.method={peft_method}",
        ],
    )
    return federated_finetune(config=config)
