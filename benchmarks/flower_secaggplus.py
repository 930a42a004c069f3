"""Flower's own SecAgg+ (flwr's `SecAggPlusWorkflow` and `secaggplus_mod`), timed in one process.

Runs in a separate virtual environment with only `flwr` (its pinned web stack conflicts with
Prefect's), started by `secagg_cost.py --flower`. The workflow drives the real Flower client apps
through an in-process grid that calls each app directly, so no transport or Ray is measured:
client time is spent inside the client apps, server time is the rest of the workflow minus the
in-process "wire" (protobuf round trips that give each client its own copy of a message, and
measure each reply). Bytes are the protobuf size of each client's replies, as Flower would put
them on the wire.

    .venv-flower/bin/python benchmarks/flower_secaggplus.py --clients 10 --length 460800 --shares 10

Prints one JSON row (the same fields as secagg_cost.py's rows).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, serde
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow
from flwr.serverapp.grid import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from peak_memory import peak_mb, reset_peak

MADE_SECONDS = [0.0]  # time spent making the clients' vectors: the benchmark's, not Flower's


def vector_of(nid: int, length: int) -> np.ndarray:
    """Client `nid`'s update, made on demand: the benchmark holds no N vectors (as secagg_cost.py)."""
    return np.random.default_rng(nid).uniform(-1, 1, length).astype(np.float32)


class VectorClient(NumPyClient):
    def __init__(self, nid: int, length: int) -> None:
        self.nid, self.length = nid, length

    def fit(self, parameters: Any, config: Any) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        start = time.perf_counter()
        vector = vector_of(self.nid, self.length)
        MADE_SECONDS[0] += time.perf_counter() - start
        return [vector], 1, {}


def _client_fn(nid: int, length: int) -> Any:
    def client_fn(context: Context) -> Any:  # Flower checks this exact signature
        return VectorClient(nid, length).to_client()

    return client_fn


class InProcessGrid(Grid):
    """Delivers each message to the destination's client app; drops `silent` nodes' masked vectors."""

    def __init__(self, apps: dict[int, ClientApp], silent: set[int]) -> None:
        self.apps, self.silent = apps, silent
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={}) for nid in apps
        }
        self.client_seconds = self.transport_seconds = 0.0
        self.bytes_sent = dict.fromkeys(apps, 0)
        self._run = Run.create_empty(1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.apps)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("the workflow only uses send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("the workflow only uses send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            nid = message.metadata.dst_node_id
            stage = message.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            if nid in self.silent and stage in (Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK):
                continue
            start = time.perf_counter()
            # the wire: each client gets its own copy (the workflow shares one content object)
            message = Message(
                content=serde.recorddict_from_proto(serde.recorddict_to_proto(message.content)),
                dst_node_id=nid,
                message_type=message.metadata.message_type,
                group_id=message.metadata.group_id,
            )
            self.transport_seconds += time.perf_counter() - start
            start = time.perf_counter()
            reply = self.apps[nid](message, self.contexts[nid])
            self.client_seconds += time.perf_counter() - start
            start = time.perf_counter()
            self.bytes_sent[nid] += serde.recorddict_to_proto(reply.content).ByteSize()
            self.transport_seconds += time.perf_counter() - start
            replies.append(reply)
        return replies


def measure(n: int, length: int, shares: int, threshold: int) -> dict[str, Any]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a SuperLink would set
    before_mb = reset_peak()
    dropped = set(range(1, n + 1, 10)) if n >= 10 else set()
    apps = {nid: ClientApp(client_fn=_client_fn(nid, length), mods=[secaggplus_mod]) for nid in range(1, n + 1)}
    grid = InProcessGrid(apps, dropped)
    server_context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    strategy = FedAvg(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n)
    context = LegacyContext(server_context, strategy=strategy, client_manager=SimpleClientManager())
    for nid in apps:
        context.client_manager.register(GridClientProxy(nid, grid, run_id=1))
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    start_params = ndarrays_to_parameters([np.zeros(length, dtype=np.float32)])
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(start_params, keep_input=True)
    workflow = SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold, clipping_range=1.0)
    start = time.perf_counter()
    workflow(grid, context)
    total_seconds = time.perf_counter() - start
    aggregated = context.state.array_records[MAIN_PARAMS_RECORD]
    mean = next(iter(aggregated.values())).numpy().reshape(-1)
    alive = [nid for nid in apps if nid not in dropped]
    expected = sum((vector_of(nid, length).astype(np.float64) for nid in alive), np.zeros(length)) / len(alive)
    client_seconds = grid.client_seconds - MADE_SECONDS[0]
    return {
        "clients": n,
        "length": length,
        "dropped": len(dropped),
        "client_ms_mean": 1000 * client_seconds / n,
        "server_ms": 1000 * (total_seconds - grid.client_seconds - grid.transport_seconds),
        "bytes_per_client": sum(grid.bytes_sent.values()) / n,
        "max_abs_error": float(np.max(np.abs(mean - expected))),
        "peak_rss_mb": peak_mb(),
        "round_mb": peak_mb() - before_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Flower SecAgg+ cost, in one process")
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--shares", type=int, required=True, help="Flower's num_shares (neighbours + itself)")
    parser.add_argument("--threshold", type=int, required=True)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    measure(3, 16, 3, 2)  # warm-up: the modules Flower loads in its first round are not the round's memory
    MADE_SECONDS[0] = 0.0
    print(json.dumps(measure(args.clients, args.length, args.shares, args.threshold)))


if __name__ == "__main__":
    main()
