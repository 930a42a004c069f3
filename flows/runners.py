"""The task runner that runs a round's client trainings, chosen by `federation.runner`.

`threads` trains in the flow's own process. `dask` and `ray` train on the workers of the cluster
at `federation.cluster_address`, or of a local one started for the run with
`max_parallel_clients` single-threaded worker processes. Workers run the same code on the same
paths (model, partitions, the run's folder) as the flow, so a real cluster needs the same
installation and shared storage on every node (docs/scale.md).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from prefect.client.orchestration import get_client
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from fedtune.config.schema import FederationSection
from fedtune.core.errors import InputError


def check_runner(federation: FederationSection) -> None:
    """Refuse a runner whose Prefect integration is missing before any work starts."""
    if federation.runner == "ray" and importlib.util.find_spec("prefect_ray") is None:
        raise InputError(
            "federation.runner: 'ray' needs prefect-ray, which is not installed (pip install prefect-ray, "
            "or fedtune's `ray` extra)"
        )


def _api_url() -> str:
    """The Prefect API this process reports to (a temporary server's too), so that a local
    cluster's workers report there instead of each starting a server of its own."""
    return str(get_client(sync_client=True).api_url)


def task_runner(federation: FederationSection) -> TaskRunner[Any]:
    check_runner(federation)
    address, width = federation.cluster_address, federation.max_parallel_clients
    if federation.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        workers = {"n_workers": width, "threads_per_worker": 1, "dashboard_address": None}
        return DaskTaskRunner(cluster_kwargs={**workers, "env": {"PREFECT_API_URL": _api_url()}})
    if federation.runner == "ray":
        from prefect_ray import RayTaskRunner

        if address:
            return RayTaskRunner(address=address)
        env = {"env_vars": {"PREFECT_API_URL": _api_url()}}
        return RayTaskRunner(init_kwargs={"num_cpus": width, "runtime_env": env})
    return ThreadPoolTaskRunner()
