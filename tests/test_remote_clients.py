"""A deployed round rides out an orchestration API that fails for a while.

The one-machine Prefect server keeps its state in SQLite and answers 503 while writes keep colliding
on a loaded machine, after the Prefect client has retried by itself (CI saw a round fail on one such
503). The coordinator waits those out until the client deadline, starts each client's run at most
once (an idempotency key per client and round attempt), and fails at once on a refusal (4xx)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from uuid import uuid4

import httpx
import pytest

import flows.remote_clients as remote_clients
from fedtune.config.schema import build_config
from fedtune.deployment.exchange import REPORT, Exchange, client_file
from flows.heartbeats import HeartbeatWatch

NAMESPACE = "0123456789abcdef0123456789abcdef/round_0001-0a1b2c3d"
LOST_REPLY = RuntimeError("the run was created; its reply was lost")


def _status_error(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1:4200/api/deployments/x/create_flow_run")
    return httpx.HTTPStatusError(
        f"Server error '{code}'", request=request, response=httpx.Response(code, request=request)
    )


def _report(client: int) -> bytes:
    numbers = ("train_loss", "bytes_up", "bytes_down", "train_loss_first", "train_loss_last", "val_loss", "steps")
    row = {"client": client, "round": 1, "num_examples": 10, "tokens": 100, "seconds": 1.0, "val_seconds": 0.1}
    return json.dumps(row | dict.fromkeys(numbers, 1)).encode()


class _Api:
    """Prefect's client as the polling loop uses it: every run is Running; reads fail `failing` times."""

    def __init__(self, failing: int, polled: Any) -> None:
        self.failing, self.polled = failing, polled

    def __enter__(self) -> _Api:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read_flow_run(self, flow_run_id: Any) -> Any:
        if self.failing:
            self.failing -= 1
            raise httpx.ConnectError("connection refused")
        self.polled(flow_run_id)
        return SimpleNamespace(state=SimpleNamespace(name="Running", message="", is_final=lambda: False))

    def set_flow_run_state(self, flow_run_id: Any, state: Any, force: bool) -> None:
        raise _status_error(503)  # cancelling is best effort: a failure must not fail the round


def _round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answers: dict[int, list[Any]], reads_failing: int = 0):  # type: ignore[no-untyped-def]
    """Run `train_remotely` for clients 0-2 with the API answering each client's start as `answers`
    says, in turn (an error raised, or a flow run; the last answer repeats). Returns its result and
    the idempotency keys each client's starts carried."""
    exchange = Exchange(str(tmp_path / "exchange"))
    keys: dict[int, list[str]] = {c: [] for c in answers}

    def run_deployment(name: str, parameters: dict[str, Any], idempotency_key: str, **_: Any) -> Any:
        client = parameters["client"]
        keys[client].append(idempotency_key)
        answer = answers[client][min(len(keys[client]), len(answers[client])) - 1]
        if isinstance(answer, Exception):
            if answer is LOST_REPLY:  # created, but its reply lost: the client runs and delivers all the same
                exchange.put(client_file(client, NAMESPACE, REPORT), _report(client))
                raise _status_error(503)
            raise answer
        started.append(client)  # it delivers after the coordinator has polled its run
        return SimpleNamespace(id=uuid4(), work_pool_name=None)

    def deliver_when_polled(flow_run_id: Any) -> None:
        for client in started:
            exchange.put(client_file(client, NAMESPACE, REPORT), _report(client))
        started.clear()

    started: list[int] = []

    monkeypatch.setattr(remote_clients, "run_deployment", run_deployment)
    monkeypatch.setattr(remote_clients, "get_client", lambda sync_client: _Api(reads_failing, deliver_when_polled))
    monkeypatch.setattr(remote_clients, "get_run_logger", lambda: SimpleNamespace(warning=lambda *a: None))
    monkeypatch.setattr(remote_clients, "coordinator_exchange", lambda deployment: exchange)
    config = build_config(
        {"federation": {"client_timeout_s": 2}, "deployment": {"poll_s": 0.05}, "secagg": {"enabled": True}}
    )
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "global").write_bytes(b"g")
    (tmp_path / "view").write_bytes(b"v")
    result = remote_clients.train_remotely(
        config, NAMESPACE, 1, sorted(answers), tmp_path / "global", tmp_path / "view", tmp_path
    )
    return result, keys


def test_a_round_waits_out_503s_and_drops_only_the_client_the_api_never_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok = "run"
    answers = {0: [_status_error(503), _status_error(503), ok], 1: [ok], 2: [_status_error(503)], 3: [LOST_REPLY]}
    (reports, dropped), keys = _round(tmp_path, monkeypatch, answers, reads_failing=2)
    assert [r["client"] for r in reports] == [0, 1, 3]  # 3: collected though the API never confirmed its run
    (why,) = dropped
    assert why.startswith("client 2: missed the 2 s deadline (the Prefect API failed: Server error '503'"), why
    assert len(keys[0]) == 3 and len(set(keys[0])) == 1  # retries of one start carry one key: one run at most
    assert len({keys[0][0], keys[1][0], keys[2][0]}) == 3  # each client's run is its own


def test_a_refusal_by_the_api_fails_the_round_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 404 (no such client deployment) is a configuration error, not an outage to wait out."""
    with pytest.raises(httpx.HTTPStatusError, match="404"):
        _round(tmp_path, monkeypatch, {0: ["run"], 1: [_status_error(404)]})


def test_a_resumed_round_starts_fresh_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key names the attempt: a round resumed after a crash must not get back the dead runs."""
    _, first = _round(tmp_path / "a", monkeypatch, {0: ["run"]})
    _, second = _round(tmp_path / "b", monkeypatch, {0: ["run"]})
    assert first[0] != second[0]


class _Pools:
    """The workers' heartbeats as the server records them: pool -> worker name -> last heartbeat."""

    def __init__(self) -> None:
        self.last: dict[str, dict[str, datetime.datetime | None]] = {}

    def read_workers_for_work_pool(self, pool: str) -> list[Any]:
        beats = self.last.get(pool, {}).items()
        return [SimpleNamespace(name=n, last_heartbeat_time=t, heartbeat_interval_seconds=10) for n, t in beats]


def _ago(seconds: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds)


def _watch(pools: _Pools) -> HeartbeatWatch:
    return HeartbeatWatch(pools, remote_clients._transient)


def test_a_pool_is_gone_once_its_workers_miss_three_beats_while_another_pool_keeps_beating() -> None:
    pools = _Pools()
    watch = _watch(pools)
    pools.last = {"client-0": {"w0": _ago(45)}, "client-1": {"w1": _ago(41)}, "client-2": {}}
    for beat in (35, 25, 15, 5):  # client-0's worker beats on; client-1's went silent 41 s ago
        pools.last["client-0"]["w0"] = _ago(beat)
        watch.observe(pools.last)
    assert watch.gone("client-1") == "every worker of its pool client-1 stopped sending heartbeats"
    assert watch.gone("client-0") is None  # alive
    assert watch.gone("client-2") is None  # no worker on record yet: nothing says it is gone
    pools.last["client-1"]["w1"] = _ago(1)  # it came back
    watch.observe(["client-1"])
    assert watch.gone("client-1") is None


def test_a_server_that_stopped_taking_heartbeats_drops_no_one() -> None:
    """Every worker silent alike is the server's silence (503s on a loaded machine), not a death; and
    when it takes heartbeats again, the others' first beats (scattered by their retries) and their
    beats from before the stall do not condemn a live pool that has not beaten yet."""
    pools = _Pools()
    watch = _watch(pools)
    pools.last = {"client-0": {"w0": _ago(80)}, "client-1": {"w1": _ago(75)}, "coordinator": {"c": _ago(72)}}
    for beat in (72, 62, 52):  # the coordinator's last beats before the stall, after client-0's last
        pools.last["coordinator"]["c"] = _ago(beat)
        watch.observe(pools.last)
    for _ in range(3):
        watch.observe(pools.last)
    assert [watch.gone(pool) for pool in pools.last] == [None, None, None]
    for beat in (12, 2):  # the server is back: two beats of the coordinator, one of client-1
        pools.last["coordinator"]["c"], pools.last["client-1"]["w1"] = _ago(beat), _ago(1)
        watch.observe(pools.last)
    assert watch.gone("client-0") is None


def test_a_pool_whose_read_failed_is_not_judged_on_an_old_read() -> None:
    pools = _Pools()
    watch = _watch(pools)
    pools.last = {"client-0": {"w0": _ago(45)}, "client-1": {"w1": _ago(40)}}
    for beat in (35, 25, 15, 5):
        pools.last["client-1"]["w1"] = _ago(beat)
        watch.observe(pools.last)
    assert watch.gone("client-0") is not None  # as read: silent while client-1 kept beating
    failing = pools.read_workers_for_work_pool

    def read(pool: str) -> list[Any]:
        if pool == "client-0":
            raise httpx.ConnectError("connection refused")
        return failing(pool)

    pools.read_workers_for_work_pool = read  # type: ignore[method-assign]
    watch.observe(pools.last)
    assert watch.gone("client-0") is None  # its read failed: no judgement on what it was before


def test_the_coordinators_pool_is_its_root_flow_runs_the_rounds_run_in_a_subflow() -> None:
    """Prefect creates a subflow's run without a work pool: the deployed run's pool is the root's."""
    from prefect import flow
    from prefect.runtime import flow_run

    asked: list[str] = []

    class Api:
        def read_flow_run(self, flow_run_id: str) -> Any:
            asked.append(str(flow_run_id))
            return SimpleNamespace(work_pool_name="coordinator")

    @flow
    def rounds() -> str | None:
        return remote_clients._own_pool(Api())

    @flow
    def coordinator() -> tuple[str, str | None]:
        return flow_run.id, rounds()

    root, pool = coordinator()
    assert pool == "coordinator" and asked == [root]
    assert remote_clients._own_pool(Api()) is None and asked == [root]  # outside any flow run: no pool
