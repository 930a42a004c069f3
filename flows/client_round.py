"""The client organization's flow: one round of local training, run by that organization's worker.

The coordinator triggers it (`run_deployment` on the client's work pool) with the round's
exchange namespace. It fetches the published global adapter, trains on data only this worker can
read, and publishes a report of numbers and its update: as a file, or with `secagg.enabled` only
masked, by running its side of the secure aggregation protocol over the exchange. The data, the
private folder (secrets, privacy ledger), the unmasked update and the model stay on the client's
side.

The worker's environment says whose worker it is (set by `deploy/parties.py`):
FEDTUNE_CLIENT_ID, and FEDTUNE_CLIENT_HOME holding `partitions/client_<id>/` and `private/`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from fedtune.config.schema import FedConfig
from fedtune.core.atomic import atomic_write_bytes
from fedtune.core.errors import InputError
from fedtune.data.partition import client_dir
from fedtune.deployment.exchange import (
    GLOBAL,
    REPORT,
    SERVER_VIEW,
    UPDATE,
    check_namespace,
    client_exchange,
    client_file,
    server_file,
)
from fedtune.model.adapters import flatten, load_state
from fedtune.privacy.secagg.remote import take_part
from fedtune.privacy.secagg.settings import parameters
from fedtune.round.client import train_client
from fedtune.round.secure_round import client_input
from mlflow_tracking.lineage import dvc_md5

# what stays with the client: an owner's own watermark check (it would tell others about its key)
PRIVATE_FEATURES = ("watermark_ber_local",)


class WrongWorker(InputError):
    """A client's run reached a worker of another organization (or an unprovisioned one)."""


def client_home(client: int) -> Path:
    """This worker's own folder, after checking the run was meant for this worker's client."""
    home, owner = os.environ.get("FEDTUNE_CLIENT_HOME"), os.environ.get("FEDTUNE_CLIENT_ID")
    if home is None or owner is None:
        raise WrongWorker("this worker has no FEDTUNE_CLIENT_HOME/FEDTUNE_CLIENT_ID; start it with `deploy/` recipes")
    if int(owner) != client:
        raise WrongWorker(f"a run for client {client} reached the worker of client {owner}; check the work pools")
    return Path(home)


@flow(name="fedtune-client")
def client_round(config: FedConfig, round_: int, client: int, namespace: str) -> dict[str, Any]:
    """Train from the round's global adapter; publish the update and the report (numbers only)."""
    check_namespace(namespace)  # whoever starts this flow cannot steer the update elsewhere (rel-08)
    home = client_home(client)
    cfg = config.model_copy(
        update={"data": config.data.model_copy(update={"partitions_dir": str(home / "partitions")})}
    )
    exchange = client_exchange(config.deployment, home / "private")
    deadline = time.monotonic() + config.federation.client_timeout_s
    private = home / "private"
    work = private / "rounds" / namespace.replace("/", "_")
    global_path = atomic_write_bytes(
        exchange.wait(server_file(namespace, GLOBAL), deadline, config.deployment.poll_s),
        work / "global.safetensors",
    )
    view = exchange.get(server_file(namespace, SERVER_VIEW))  # published before the global
    if view is None:
        raise RuntimeError(f"round {round_}: the coordinator published no server view")
    view_path = atomic_write_bytes(view, work / "server_view.safetensors")
    report = train_client(
        cfg,
        client=client,
        round_=round_,
        global_path=global_path,
        update_path=work / "update.safetensors",
        private_dir=private,
        server_view_path=view_path,
    )
    public = report.model_copy(
        update={
            "update_path": None,  # a path of the client's own machine
            "data_version": dvc_md5(client_dir(home / "partitions", client)),  # lineage, for the coordinator
            "features": {k: v for k, v in report.features.items() if k not in PRIVATE_FEATURES},
        }
    ).row()
    if config.secagg.enabled:  # the update leaves only masked, through the protocol's stages
        exchange.put(client_file(client, namespace, REPORT), json.dumps(public).encode())
        _, spec = flatten(load_state(global_path))
        encode = client_input(config, spec, work / "update.safetensors", report.num_examples, round_, private)
        stages_deadline = time.monotonic() + config.federation.client_timeout_s + 4 * config.secagg.stage_timeout_s
        params, _ = parameters(config)
        sent = take_part(exchange, namespace, client, params, round_, encode, stages_deadline, config.deployment.poll_s)
        public["protocol_bytes_up"] = sent
    else:  # the report last: once it is there, so is the update
        exchange.put(client_file(client, namespace, UPDATE), (work / "update.safetensors").read_bytes())
        exchange.put(client_file(client, namespace, REPORT), json.dumps(public).encode())
    get_run_logger().info(
        "round %d client %d: %d B up, val loss %s", round_, client, public["bytes_up"], public.get("val_loss", "none")
    )
    return public
