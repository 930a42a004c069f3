"""A whole federation brought up on this machine and torn down again: what `python -m deploy up`
runs for a person, and what the deployment tests and benchmark run for themselves."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

from deploy import parties, servers
from deploy.secrets import prefect_auth
from fedtune.config.schema import FedConfig
from fedtune.data.loading import load_records, write_jsonl
from fedtune.training.tokenized import partition_records

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Federation:
    prefect: servers.Server
    mlflow: servers.Server
    gateway: servers.Server  # the client organizations' Prefect API (deploy/gateway.py)
    layout: parties.Layout
    workers: dict[str, Popen[bytes]]
    config: FedConfig  # the coordinator deployment's default parameters


def coordinator_config(config: FedConfig, layout: parties.Layout, mlflow_url: str, model_dir: Path) -> FedConfig:
    """The user's config, pointed at the coordinator's folders, the tracking server, the exchange and
    the parties' copy of the model."""
    return config.model_copy(
        update={
            "model": config.model.model_copy(update={"name_or_path": str(model_dir)}),
            "data": config.data.model_copy(update={"partitions_dir": str(layout.coordinator / "partitions")}),
            "federation": config.federation.model_copy(
                update={"output_dir": str(layout.coordinator / "runs" / "federated")}
            ),
            "tracking": config.tracking.model_copy(update={"tracking_uri": mlflow_url, "artifact_location": ""}),
            "deployment": config.deployment.model_copy(
                update={"enabled": True, "exchange": str(layout.exchange), "client_keys": str(layout.client_keys)}
            ),
        }
    )


def _raw_data(config: FedConfig, needed: list[Path]) -> list[Path]:
    """The folder of the undistributed data file (`data.source`), hidden from every party unless it
    holds something every party needs (the checkout itself, say: then keep raw data outside it)."""
    raw = Path(config.data.source)
    if not raw.exists():
        return []  # a generated or hub data set
    folder = (raw if raw.is_dir() else raw.parent).resolve()
    return [] if any(p.resolve().is_relative_to(folder) for p in needed) else [folder]


def shared_model(model_dir: Path, copy: Path) -> Path:
    """The model where every party's user can read it: a copy (hard links where the file system
    allows) with world-readable modes, since `model_dir` may sit in a folder only root can enter."""
    if not copy.exists():
        try:
            shutil.copytree(model_dir, copy, copy_function=os.link)
        except OSError:  # another file system
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(model_dir, copy)
    for folder, _, files in os.walk(copy):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)
    return copy


def distribute_from(config: FedConfig) -> list[Path]:
    """Prepare and partition `config`'s data; returns the folders of the undistributed data, which
    no party's worker may see (each gets its own partition through `parties.provision`)."""
    records = load_records(config.data)
    write_jsonl(records, config.data.processed_path)
    partition_records(config, records)
    return [Path(config.data.processed_path).resolve().parent, Path(config.data.partitions_dir).resolve()]


@contextmanager
def running(
    config: FedConfig,
    root: Path,
    model_dir: Path,
    source: list[Path],
    *,
    host: str = "127.0.0.1",
    prefect_port: int | None = None,
    mlflow_port: int | None = None,
    drills: dict[int, str] | None = None,
) -> Iterator[Federation]:
    """Servers (auth on), a folder, work pool and confined worker per party, every deployment made.

    `config` has been partitioned already (its `data.partitions_dir`); `source` lists the folders of
    the undistributed data, hidden from every worker. This process's Prefect client talks to the
    new server while the federation runs."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    root = root.resolve()
    clients = config.data.partition.num_clients
    prefect_port = prefect_port or servers.free_port(host)
    while not mlflow_port or mlflow_port == prefect_port:  # both are picked before either server binds
        mlflow_port = servers.free_port(host)
    with ThreadPoolExecutor(2) as starting:  # both servers start at once: each mostly waits to answer
        prefect_up = starting.submit(servers.start_prefect, root / "prefect", prefect_port, host)
        mlflow_up = starting.submit(servers.start_mlflow, root / "mlflow", mlflow_port, host)
    failed = [error for f in (prefect_up, mlflow_up) if (error := f.exception()) is not None]
    if failed:  # the one that started does not outlive the failure
        for up in (f for f in (prefect_up, mlflow_up) if f.exception() is None):
            up.result().stop()
        raise failed[0]
    prefect, mlflow = prefect_up.result(), mlflow_up.result()
    gateway: servers.Server | None = None
    workers: dict[str, Popen[bytes]] = {}
    stage = tempfile.TemporaryDirectory(prefix="fedtune-exposed-")  # mount points, outside everything exposed
    try:
        layout = parties.provision(Path(config.data.partitions_dir), root / "parties", clients)
        model = shared_model(model_dir, root / "model")
        parties.create_pools(prefect.url, clients)
        deployed = coordinator_config(config, layout, mlflow.url, model)
        parties.deploy_all(prefect.url, REPO, layout, clients, mlflow.url, model, deployed.model_dump(mode="json"))
        stores = [prefect.log.parent, root / "mlflow", layout.root / "logs"]
        credentials = root / "gateway" / "credentials.json"
        access = parties.Access(prefect.url, "", parties.issue_credentials(credentials, clients))
        gateway = servers.start_gateway(prefect.url, credentials, servers.free_port(host), host)
        access = dataclasses.replace(access, gateway=gateway.url)
        stores.append(credentials.parent)
        parties.hand_over(layout, clients, access, stores)
        # what every party's user must reach: the interpreter, the environment, the code, the parties, the model
        needed = [Path(sys.base_prefix), Path(sys.prefix), REPO, layout.root, model]
        exposed = parties.exposing(needed, Path(stage.name))
        hidden = [*source, *_raw_data(config, needed)]
        workers = parties.start_workers(access, layout, clients, hidden, stores, exposed, drills)
        with temporary_settings(updates={PREFECT_API_URL: prefect.url, PREFECT_API_AUTH_STRING: prefect_auth()}):
            yield Federation(prefect, mlflow, gateway, layout, workers, deployed)
    finally:
        for worker in workers.values():
            parties.stop(worker)
        if gateway is not None:
            gateway.stop()
        prefect.stop()
        mlflow.stop()
        stage.cleanup()
