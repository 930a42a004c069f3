"""Continual learning: a scheduled deployment whose every run carries the registry's champion forward.

A run starts from the adapter the alias (`tracking.champion_alias`, `champion` by default) names
on `tracking.registered_model`, or a fresh one before the first promotion, trains
`federation.rounds` rounds on the clients' current data, and moves the alias to its result only
if that beats its start on the held-out test set.
Runs never overlap (deployment concurrency limit 1; a tick that finds a run going is cancelled),
so each run starts from the outcome of the one before.
"""

from __future__ import annotations

import tempfile
from typing import Any

from prefect import flow
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from fedtune.config.schema import FedConfig
from flows.common import prepare
from flows.federated_finetune import federated_finetune
from tasks.continual import data_versions, fetch_champion, settle


@flow(name="continual-learning")
def continual_learning(
    config: FedConfig = FedConfig(),  # noqa: B008 (Prefect shows the defaults in the run form)
    alias: str | None = None,
    prepare_data: bool = True,
) -> dict[str, Any]:
    """One step: the champion in, R federated rounds on the newest data, a new champion out if it is better.

    `alias` names the champion; None: the config's `tracking.champion_alias`, the alias every
    other run's registration moves. With `prepare_data` the partitions are rebuilt from
    `data.source` first; without, the run uses them as they are (e.g. after `dvc pull` or
    `dvc repro partition`)."""
    alias = alias or config.tracking.champion_alias
    prepare(config, data=prepare_data)
    versions = data_versions(config)
    trial = config.model_copy(update={"tracking": config.tracking.model_copy(update={"register_final": "never"})})
    with tempfile.TemporaryDirectory() as tmp:
        champion = fetch_champion(config, alias, tmp)
        summary = federated_finetune(
            config=trial, prepare_data=False, init_adapter=champion["adapter"] if champion else None
        )
    return settle(config, alias, summary, champion, versions)


def deployment(
    config: FedConfig, *, interval: float | None = None, cron: str | None = None, name: str = "scheduled"
) -> RunnerDeployment:
    """The flow on an interval (seconds) or cron schedule with `config` as its parameter, one run at a time."""
    return RunnerDeployment.from_flow(
        continual_learning,
        name,
        interval=interval,
        cron=cron,
        parameters={"config": config.model_dump(mode="json")},
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
