"""The Prefect API gateway (deploy/gateway.py): each client organization's credential reaches its own
work pool's deployment and flow runs only; the rest is refused before the server sees it.
The server here is a stand-in that answers the ownership reads and records what reached it; the
deployed rounds in tests/test_deployment.py run through the gateway against a real Prefect server."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from deploy import gateway
from fedtune.core.errors import InputError

ADMIN = "fedtune-admin:server-auth-string"
# fixed ids: they name parametrized tests, which every xdist worker must collect alike
D0, D1, DC = (str(uuid.UUID(int=n)) for n in (1, 2, 3))  # client-0's, client-1's and the coordinator's deployment
Q0, Q1 = str(uuid.UUID(int=4)), str(uuid.UUID(int=5))  # client-0's and client-1's work queue
F0, F1, FC = (str(uuid.UUID(int=n)) for n in (6, 7, 8))  # a flow run of each
T0 = str(uuid.UUID(int=9))  # a task run in F0
POOLS = {D0: "client-0", D1: "client-1", DC: "coordinator", F0: "client-0", F1: "client-1", FC: "coordinator"}
POOLS |= {Q0: "client-0", Q1: "client-1"}


class Server:
    """Answers GET /deployments/{id}, /flow_runs/{id} and /work_queues/{id} with their work_pool_name
    as Prefect does (counted in `lookups`); records every other request with the Authorization it
    carried and its body."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []  # method, path, authorization
        self.bodies: list[bytes] = []
        self.lookups = 0
        self.failing = 0  # answer this many ownership reads with 503

    def __call__(self, request: httpx.Request) -> httpx.Response:
        kind, _, id_ = request.url.path.removeprefix("/api/").partition("/")
        if request.method == "GET" and kind in ("deployments", "flow_runs", "work_queues") and "/" not in id_:
            self.lookups += 1
            if self.failing:
                self.failing -= 1
                return httpx.Response(503, json={"detail": "database is locked"})
            if id_ in POOLS:
                return httpx.Response(200, json={"id": id_, "work_pool_name": POOLS[id_]})
            return httpx.Response(404, json={"detail": "not found"})
        self.seen.append((request.method, request.url.path, request.headers.get("authorization", "")))
        self.bodies.append(request.content)
        return httpx.Response(200, json={"ok": True})


def _basic(auth: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


@pytest.fixture
def credentials(tmp_path: Path) -> tuple[Path, str, str]:
    file = tmp_path / "credentials.json"
    return file, gateway.issue(file, "client-0", "client-0"), gateway.issue(file, "client-1", "client-1")


@pytest.fixture
def server() -> Server:
    return Server()


@pytest.fixture
def client(credentials: tuple[Path, str, str], server: Server) -> Iterator[TestClient]:
    app = gateway.app("http://prefect/api", ADMIN, gateway.Credentials(credentials[0]), httpx.MockTransport(server))
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def party(credentials: tuple[Path, str, str]) -> dict[str, str]:
    return _basic(credentials[1])  # client-0's


def test_a_party_needs_its_own_valid_credential(client: TestClient, credentials: tuple[Path, str, str], server: Server):
    file, own, _ = credentials
    name, _, password = own.partition(":")
    for headers in [
        {},
        _basic(ADMIN),
        _basic(f"{name}:{password[:-1]}x"),
        _basic(f"client-9:{password}"),
        _basic(own[:-1]),
    ]:
        assert client.get("/api/admin/version", headers=headers).status_code == 401, headers
    assert client.get("/api/admin/version", headers={"Authorization": "Bearer " + password}).status_code == 401
    assert server.seen == []
    assert password not in file.read_text()  # the gateway keeps a digest, never the credential
    assert client.get("/api/admin/version", headers=_basic(own)).status_code == 200


def test_a_workers_calls_on_its_own_pool_reach_the_server_with_the_servers_auth(
    client: TestClient, party: dict[str, str], server: Server
):
    allowed = [
        ("GET", "/api/work_pools/client-0", None),
        ("GET", "/api/csrf-token?client=" + str(uuid.uuid4()), None),
        ("POST", "/api/work_pools/client-0/workers/heartbeat", {"name": "w"}),
        ("POST", "/api/work_pools/client-0/get_scheduled_flow_runs", {}),
        ("POST", "/api/work_pools/client-0/queues/filter", {}),
        ("GET", f"/api/work_queues/{Q0}", None),
        ("GET", "/api/admin/storage", None),
        (
            "POST",
            "/api/flow_runs/filter",
            {"flow_runs": {"id": {"any_": [F0]}, "state": {"type": {"any_": ["CANCELLING"]}}}},
        ),
        ("GET", f"/api/deployments/{D0}", None),
        ("GET", f"/api/flow_runs/{F0}", None),
        ("PATCH", f"/api/flow_runs/{F0}", {"infrastructure_pid": "1"}),
        ("PATCH", f"/api/flow_runs/{F0}/labels", {"prefect.worker.name": "w"}),
        ("POST", f"/api/flow_runs/{F0}/set_state", {"state": {"type": "RUNNING"}}),
        ("POST", "/api/logs/", [{"flow_run_id": F0, "message": "m"}, {"flow_run_id": None, "message": "worker"}]),
    ]
    for method, path, body in allowed:
        answer = client.request(method, path, headers=party, content=None if body is None else json.dumps(body))
        assert answer.status_code == 200, (method, path, answer.text)
    lookups = ("/api/deployments/", "/api/flow_runs/", "/api/work_queues/")  # the stand-in answers
    reached = [(m, p) for m, p, _ in server.seen]
    assert reached == [(m, p.partition("?")[0]) for m, p, _ in allowed if m != "GET" or not p.startswith(lookups)]
    assert {auth for _, _, auth in server.seen} == {_basic(ADMIN)["Authorization"]}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/work_pools/client-1", None),
        ("POST", "/api/work_pools/client-1/get_scheduled_flow_runs", {}),
        ("POST", "/api/work_pools/coordinator/workers/heartbeat", {"name": "w"}),
        ("GET", f"/api/deployments/{D1}", None),
        ("GET", f"/api/flow_runs/{F1}", None),
        ("GET", f"/api/flow_runs/{FC}", None),  # the coordinator's parameters
        ("PATCH", f"/api/flow_runs/{F1}", {"parameters": {}}),
        ("PATCH", f"/api/flow_runs/{F1}/labels", {"forged": "yes"}),
        # state data naming an artifact: the server would file it under a key every party shares
        (
            "POST",
            f"/api/flow_runs/{F0}/set_state",
            {"state": {"type": "SCHEDULED", "data": {"artifact_key": "mlflow-run", "artifact_type": "markdown"}}},
        ),
        ("POST", "/api/work_pools/client-1/queues/filter", {}),
        ("PATCH", "/api/work_pools/client-0", {"base_job_template": {}}),
        ("POST", f"/api/flow_runs/{F1}/set_state", {"state": {"type": "CANCELLED"}}),
        # task runs: a client's flow has none, and Prefect's task cache and task-run recorder would let
        # one party's task run reach another's
        ("POST", "/api/task_runs/", {"flow_run_id": F0, "task_key": "k"}),
        ("GET", f"/api/task_runs/{T0}", None),
        ("POST", f"/api/task_runs/{T0}/set_state", {"state": {"type": "RUNNING"}}),
        ("POST", "/api/logs/", [{"flow_run_id": F0, "task_run_id": T0}]),
        ("POST", "/api/logs/", [{"flow_run_id": F0}, {"flow_run_id": F1, "message": "forged"}]),
        ("POST", "/api/logs/", [{"flow_run_id": ["unhashable"]}]),
        ("POST", "/api/logs/", [{"flow_run_id": str(uuid.uuid4())} for _ in range(gateway.MAX_RUNS + 1)]),
        ("POST", "/api/logs/", "not a list"),
        # its own deployment is not its to edit: a changed entrypoint or pull step runs in its worker,
        # and the coordinator's would run on the coordinator's
        ("PATCH", f"/api/deployments/{D0}", {"pull_steps": []}),
        ("DELETE", f"/api/deployments/{D1}", None),
        ("POST", f"/api/deployments/{DC}/create_flow_run", {"parameters": {}}),
        ("POST", "/api/flow_runs/filter", {}),
        ("POST", "/api/flow_runs/filter", {"flow_runs": {"id": {"any_": [F0, F1]}}}),
        ("POST", "/api/flow_runs/filter", {"flow_runs": {"id": {"any_": []}}}),
        (
            "POST",
            "/api/flow_runs/filter",
            {"flow_runs": {"operator": "or_", "id": {"any_": [F0]}, "name": {"like_": ""}}},
        ),
        ("GET", f"/api/work_queues/{Q1}", None),
        ("POST", "/api/deployments/filter", {}),
        ("POST", "/api/logs/filter", {}),
        ("POST", "/api/work_pools/", {"name": "client-0-shadow"}),
        ("GET", "/api/variables/name/secret", None),
        ("GET", "/api/work_pools/client-0/../client-1", None),
        ("GET", f"/api/flow_runs/{F0}/../{F1}", None),
    ],
)
def test_everything_outside_its_own_pool_is_refused_before_the_server_sees_it(
    client: TestClient, party: dict[str, str], server: Server, method: str, path: str, body: object
):
    answer = client.request(method, path, headers=party, content=None if body is None else json.dumps(body))
    assert answer.status_code in (403, 404), answer.text
    assert server.seen == []


def test_a_server_that_cannot_say_who_owns_a_run_gets_a_retry_not_a_refusal(
    client: TestClient, party: dict[str, str], server: Server
):
    server.failing = 1
    assert client.post(f"/api/flow_runs/{F0}/set_state", headers=party, content="{}").status_code == 503
    assert client.post(f"/api/flow_runs/{F0}/set_state", headers=party, content="{}").status_code == 200
    assert [p for _, p, _ in server.seen] == [f"/api/flow_runs/{F0}/set_state"]


def _event(resource: str, **extra: object) -> str:
    event = {"event": "prefect.flow-run.Running", "resource": {"prefect.resource.id": resource}}
    return json.dumps(event | extra)


def test_events_about_its_own_flow_runs_only_reach_the_server_and_name_nobody_else(
    client: TestClient, credentials: tuple[Path, str, str], server: Server
):
    """An event's related resources and a task run's event payload could point at anybody's run
    (Prefect's task-run recorder builds rows from them): only events about the party's own flow runs
    go on, without related resources."""
    victim = {"prefect.resource.id": f"prefect.flow-run.{F1}", "prefect.resource.role": "flow-run"}
    hijack = {"task_run": {"id": str(uuid.uuid4()), "flow_run_id": F1, "name": "HIJACKED"}}
    with client.websocket_connect("/api/events/in", subprotocols=["prefect"]) as socket:
        socket.send_json({"type": "auth", "token": credentials[1]})
        assert socket.receive_json() == {"type": "auth_success"}
        for resource in [f"prefect.flow-run.{F1}", f"prefect.flow-run.{FC}", "prefect.deployment." + D0]:
            socket.send_text(_event(resource))
        for task_run in (T0, F0):  # a task-run event, even one carrying an id of the party's own
            socket.send_text(_event(f"prefect.task-run.{task_run}", related=[victim], payload=hijack))
        # a task-run event about its own flow run: the server's task-run recorder would choke on it
        socket.send_text(_event(f"prefect.flow-run.{F0}", event="prefect.task-run.Running"))
        for malformed in ["not json", '{"resource": []}', "[]", json.dumps({"resource": {"prefect.resource.id": 7}})]:
            socket.send_text(malformed)  # dropped; the stream goes on
        socket.send_bytes(b"\x00binary")
        socket.send_text(_event(f"prefect.flow-run.{F0}", related=[victim]))
    assert [p for _, p, _ in server.seen] == ["/api/events"]
    (forwarded,) = json.loads(server.bodies[0])
    assert forwarded["resource"]["prefect.resource.id"] == f"prefect.flow-run.{F0}" and forwarded["related"] == []


def test_event_sockets_without_a_partys_credential_are_closed(client: TestClient, monkeypatch: pytest.MonkeyPatch):
    with client.websocket_connect("/api/events/in", subprotocols=["prefect"]) as socket:
        socket.send_json({"type": "auth", "token": ADMIN})
        with pytest.raises(WebSocketDisconnect) as refused:
            socket.receive_json()
    assert refused.value.code == 1008
    monkeypatch.setattr(gateway, "HELLO_S", 0.2)  # one that never says who it is is not kept open
    with (
        client.websocket_connect("/api/events/in", subprotocols=["prefect"]) as socket,
        pytest.raises(WebSocketDisconnect) as silent,
    ):
        socket.receive_json()
    assert silent.value.code == 1008
    with (
        client.websocket_connect("/api/events/out", subprotocols=["prefect"]) as socket,
        pytest.raises(WebSocketDisconnect) as refused,
    ):
        socket.receive_json()
    assert refused.value.code == 1008
    # Prefect 3.9's worker channel: closed with 1008, which its worker takes as final (it heartbeats over HTTP)
    with (
        client.websocket_connect("/api/work_pools/client-0/workers/connect", subprotocols=["prefect"]) as socket,
        pytest.raises(WebSocketDisconnect) as declined,
    ):
        socket.receive_json()
    assert declined.value.code == 1008


def test_one_request_cannot_make_the_gateway_flood_the_server(
    client: TestClient, party: dict[str, str], server: Server
):
    many = [{"flow_run_id": str(uuid.uuid4())} for _ in range(gateway.MAX_RUNS + 1)]
    assert client.post("/api/logs/", headers=party, content=json.dumps(many)).status_code == 403
    assert server.lookups == 0
    some = [{"flow_run_id": str(uuid.uuid4())} for _ in range(gateway.MAX_RUNS)]
    assert client.post("/api/logs/", headers=party, content=json.dumps(some)).status_code == 403
    assert server.lookups == 1  # stops at the first run that is not its own
    huge = b"[" + b" " * gateway.MAX_BODY + b"]"
    assert client.post("/api/logs/", headers=party, content=huge).status_code == 413
    assert server.seen == []


def test_a_party_over_its_rate_waits(client: TestClient, party: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(gateway, "BURST", 5.0)
    monkeypatch.setattr(gateway, "RATE", 0.01)
    answers = [client.get("/api/admin/version", headers=party).status_code for _ in range(7)]
    assert answers == [200] * 5 + [429] * 2


def test_a_reissued_credential_replaces_the_old_one_in_a_running_gateway(
    client: TestClient, credentials: tuple[Path, str, str], server: Server
):
    file, old, _ = credentials
    assert client.get("/api/admin/version", headers=_basic(old)).status_code == 200
    with client.websocket_connect("/api/events/in", subprotocols=["prefect"]) as socket:
        socket.send_json({"type": "auth", "token": old})
        assert socket.receive_json() == {"type": "auth_success"}
        new = gateway.issue(file, "client-0", "client-0")
        socket.send_text(_event(f"prefect.flow-run.{F0}"))  # on a socket opened with the revoked one
    assert [p for _, p, _ in server.seen] == ["/api/admin/version"]  # the event did not go on
    assert client.get("/api/admin/version", headers=_basic(old)).status_code == 401
    assert client.get("/api/admin/version", headers=_basic(new)).status_code == 200
    file.write_text("{")  # a broken file locks everybody out rather than keep what was revoked
    assert client.get("/api/admin/version", headers=_basic(new)).status_code == 401


def test_a_credentials_file_is_checked_and_a_new_credential_replaces_the_old(tmp_path: Path):
    file = tmp_path / "credentials.json"
    first = gateway.issue(file, "client-0", "client-0")
    second = gateway.issue(file, "client-0", "client-0")
    parties = gateway.read_parties(file)
    assert gateway.authenticate(parties, second) == parties["client-0"]
    assert gateway.authenticate(parties, first) is None
    assert file.stat().st_mode & 0o777 == 0o600
    for text, named in [
        ("{", "not a readable JSON"),
        ("{}", "no party"),
        ('{"client-0": {"sha256": "abc", "pool": "client-0"}}', "'sha256'"),
        ('{"client-0": {"sha256": "' + "a" * 64 + '"}}', "'pool'"),
    ]:
        file.write_text(text)
        with pytest.raises(InputError, match=named):
            gateway.read_parties(file)


def test_the_operator_issues_credentials_and_the_gateway_refuses_a_bad_file_before_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from typer.testing import CliRunner

    from deploy.__main__ import app

    file = tmp_path / "gateway.json"
    issued = CliRunner().invoke(app, ["credential", str(file), "client-1"])
    assert issued.exit_code == 0, issued.output
    credential = issued.output.strip()
    assert credential.startswith("client-1:") and credential.partition(":")[2] not in file.read_text()
    assert gateway.authenticate(gateway.read_parties(file), credential) == gateway.Party(
        "client-1", json.loads(file.read_text())["client-1"]["sha256"], "client-1"
    )
    monkeypatch.setenv("FEDTUNE_PREFECT_AUTH", "fedtune-admin:Zq8-long-gateway-secret")
    file.write_text('{"client-1": {"pool": "client-1"}}')
    refused = CliRunner().invoke(app, ["gateway", str(file)])
    assert refused.exit_code == 2 and "'sha256'" in refused.output, refused.output
