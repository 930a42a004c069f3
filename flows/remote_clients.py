"""The coordinator's side of a deployed round: trigger each sampled client's deployment, collect
what comes back through the exchange, and drop whoever fails, whose worker is gone, or who misses
the deadline.

The coordinator reads only the exchange (updates and reports) and flow-run states from the
Prefect API; a client's data directory is never opened here.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from fedtune.config.schema import FedConfig
from fedtune.core.atomic import atomic_write_bytes
from fedtune.deployment.exchange import (
    GLOBAL,
    REPORT,
    SERVER_VIEW,
    UPDATE,
    Exchange,
    client_file,
    coordinator_exchange,
    server_file,
)
from fedtune.round.client_report import ClientReport, ReportRejected
from flows.heartbeats import HeartbeatWatch


def _transient(error: Exception) -> bool:
    """An orchestration-API failure the round waits out instead of failing on: the server unreachable
    or answering 5xx after Prefect's client has retried by itself (the one-machine server keeps its
    state in SQLite, which answers 503 for as long as writes keep colliding on a loaded machine)."""
    if isinstance(error, httpx.TransportError):
        return True
    return isinstance(error, httpx.HTTPStatusError) and error.response.status_code >= 500


def _trigger(config: FedConfig, round_: int, client: int, namespace: str, attempt: str) -> FlowRun:
    """Schedule the client's flow run; the idempotency key makes a retry after a lost reply return the
    run already created, never a second one. Returns once the run is scheduled: the replies come
    through the exchange."""
    return run_deployment(  # type: ignore[return-value]  # called sync: a FlowRun, not a coroutine
        config.deployment.client_deployment.format(client=client),
        parameters={"config": config, "round_": round_, "client": client, "namespace": namespace},
        flow_run_name=f"round-{round_}-client-{client}",
        idempotency_key=f"{namespace}/round-{round_}/client-{client}/{attempt}",
        timeout=0,
    )


def _own_pool(api: Any) -> str | None:
    """The work pool of the coordinator's deployed flow run (None when it runs outside a deployment):
    its worker's heartbeats tell a stalled server from a dead client even in a one-client round. The
    rounds run in a subflow, which Prefect creates without a pool: the root flow run has it."""
    from prefect.runtime import flow_run

    try:
        root = flow_run.root_flow_run_id
        return None if root is None else api.read_flow_run(root).work_pool_name
    except httpx.HTTPError:  # the clients' pools still tell a stall from a death, in most rounds
        return None


def _collect(
    exchange: Exchange, client: int, round_: int, namespace: str, folder: Path, masked: bool
) -> dict[str, Any] | None:
    """The client's report, and its update once both are published (the report is written last).
    A `masked` update comes later, through secure aggregation, never as a file."""
    published = exchange.get(client_file(client, namespace, REPORT))
    if published is None:
        return None
    try:
        report = ClientReport.from_row(json.loads(published))
    except json.JSONDecodeError as error:
        raise ReportRejected(f"its report is not JSON ({error.msg})") from None
    if report.client != client:  # the outbox says who sent it; the report's content cannot claim another
        raise ReportRejected(f"its report claims to be client {report.client}'s")
    if report.round != round_:
        raise ReportRejected(f"its report is for round {report.round}, not {round_}")
    if masked:
        return report.row()
    update = exchange.get(client_file(client, namespace, UPDATE))
    if update is None:
        raise RuntimeError(f"client {client} published a report without its update")
    path = atomic_write_bytes(update, folder / f"update_client_{client}.safetensors")
    return report.model_copy(update={"update_path": str(path)}).row()


def train_remotely(
    config: FedConfig,
    namespace: str,
    round_: int,
    clients: list[int],
    global_path: Path,
    view_path: Path,
    round_dir: Path,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Reports of the clients that delivered in time, and why the others dropped out."""
    logger = get_run_logger()
    exchange = coordinator_exchange(config.deployment)
    masked = config.secagg.enabled
    exchange.put(server_file(namespace, SERVER_VIEW), view_path.read_bytes())  # before the global:
    exchange.put(server_file(namespace, GLOBAL), global_path.read_bytes())  # clients wait on that
    deadline = time.monotonic() + config.federation.client_timeout_s
    attempt = uuid.uuid4().hex  # a resumed round starts fresh runs; retries within this one do not
    runs: dict[int, FlowRun] = {}
    unreachable: dict[int, str] = {}  # the API error that kept a client's run from starting or being read
    reports: list[dict[str, Any]] = []
    dropped: list[str] = []
    pending = set(clients)

    def drop(client: int, why: str) -> None:  # logged at once: the log's time is when it dropped
        dropped.append(f"client {client}: {why}")
        logger.warning("round %d: %s", round_, dropped[-1])

    def api_failed(client: int, error: Exception) -> None:
        if not _transient(error):
            raise error
        if client not in unreachable:  # once per client: the deadline decides, not the first 503
            logger.warning(
                "round %d: client %d: the Prefect API failed (%s); waiting until the deadline", round_, client, error
            )
        unreachable[client] = str(error)

    with get_client(sync_client=True) as api:
        watch, own_pool = HeartbeatWatch(api, _transient), _own_pool(api)
        while pending:
            pools = [run.work_pool_name for run in runs.values()] + [own_pool]
            watch.observe(pool for pool in pools if pool is not None)
            for client in sorted(pending):
                try:
                    report = _collect(exchange, client, round_, namespace, round_dir, masked)
                    if report is None and client not in runs:  # a reply may come before the API answers
                        runs[client] = _trigger(config, round_, client, namespace, attempt)
                        continue
                    if report is None:
                        state = api.read_flow_run(runs[client].id).state
                        ended = f"{state.name} ({state.message})" if state is not None and state.is_final() else None
                        gone = None if ended else watch.gone(runs[client].work_pool_name)
                        if ended is None and gone is None:
                            unreachable.pop(client, None)
                            continue
                        report = _collect(
                            exchange, client, round_, namespace, round_dir, masked
                        )  # it may have just arrived
                        if report is None and gone is not None:
                            _cancel(api, runs[client].id)  # a worker that comes back must not start it late
                            raise RuntimeError(gone)
                        if report is None:
                            raise RuntimeError(f"its flow run ended {ended}")
                    reports.append(report)
                except httpx.HTTPError as error:
                    api_failed(client, error)
                    continue
                except (RuntimeError, ValueError) as error:
                    drop(client, str(error))
                pending.discard(client)
            if pending and time.monotonic() >= deadline:
                for client in sorted(pending):
                    why = f"missed the {config.federation.client_timeout_s:g} s deadline"
                    drop(
                        client,
                        why + (f" (the Prefect API failed: {unreachable[client]})" if client in unreachable else ""),
                    )
                    if client in runs:
                        _cancel(api, runs[client].id)
                break
            if pending:
                time.sleep(config.deployment.poll_s)
    return sorted(reports, key=lambda r: r["client"]), dropped


def _cancel(api: Any, flow_run_id: UUID) -> None:
    """Ask the client's worker to stop a run the round no longer waits for. Best effort: with the API
    down the run stays scheduled, and its late update lands in a namespace no round reads."""
    from prefect.states import Cancelling

    try:
        api.set_flow_run_state(flow_run_id, Cancelling(message="the round's client deadline passed"), force=True)
    except httpx.HTTPError as error:
        get_run_logger().warning("could not cancel flow run %s: %s", flow_run_id, error)
