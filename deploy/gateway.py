"""The Prefect API gateway: one credential per client organization, each allowed its own pool only.

Prefect's open-source server knows a single auth string (PREFECT_SERVER_API_AUTH_STRING): whoever
holds it may do anything, such as edit another client's deployment so that its worker runs their
code, read another client's flow runs and logs, or start the coordinator's deployment. So client
organizations never get it. Each gets its own credential (`user:password`, HTTP basic auth, as
Prefect's client sends PREFECT_API_AUTH_STRING) for this gateway, which checks it, allows only the
calls a worker and its flow runs make, each on that client's own work pool, its deployment and its
flow runs, and forwards them to the server with the server's auth string. Everything else is
refused (403), and a request with no valid credential gets 401. The coordinator and the operator
(and the UI) use the server itself. Prefect Cloud's workspace roles are the hosted equivalent.

Task runs are refused altogether: a client's flow (flows/client_round.py) has none, and Prefect's
server would let one party's task run reach others' (its task cache is keyed by cache key alone;
its task-run recorder builds rows from what an event's payload says). Events (`/api/events/in`, a
websocket) are taken here: the party authenticates with its own credential in Prefect's
handshake; a flow-run event about one of its own flow runs goes on with its related resources
removed (they could name anybody's), every other event is dropped; subscribing to the event stream
(`/api/events/out`) is refused, since it shows every party's events. A state's data may not name
an artifact (the server files it under a key all parties share); each party gets RATE calls per
second.

Hand-written because no Prefect component scopes access per work pool on a self-hosted server; it
is a policy of a few rules over Starlette and httpx, both of which Prefect's server ships with.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cachetools import TTLCache
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from deploy.servers import basic_auth_header
from fedtune.core.atomic import write_private
from fedtune.core.errors import InputError

log = logging.getLogger("fedtune.gateway")
UUID = r"[0-9a-fA-F-]{36}"
MAX_BODY = 5 * 2**20  # bytes; Prefect's client sends logs in batches of at most 4 MB
MAX_RUNS = 64  # distinct flow runs one request may name (a log batch or a worker's cancellation check)
HELLO_S = 10.0  # seconds a websocket may take to authenticate
# requests and events per second a party may send, and the burst it may save up: a worker and its
# flow run make a few per second; beyond it, HTTP gets 429 (Prefect's client waits and retries) and
# events are dropped unlogged, so a party cannot load the server or fill the gateway's log
RATE, BURST = 20.0, 200.0
# keys of a state's `data` that make Prefect's server file it as an artifact under a key every
# party shares (the coordinator's "mlflow-run" report, say)
ARTIFACT_FIELDS = {"artifact_key", "artifact_type", "artifact_description"}
# what Prefect's HTTP client sends that the server may act on; hop-by-hop and auth headers are not forwarded
FORWARDED = {
    "content-type",
    "accept",
    "x-prefect-api-version",
    "user-agent",
    "prefect-csrf-token",
    "prefect-csrf-client",
}


@dataclass(frozen=True)
class Party:
    name: str
    digest: str  # sha256 of the password, hex: the file leaks no usable credential
    pool: str


def _digest(password: str) -> str:
    # a random 256-bit password needs no slow hash: nothing about it can be guessed from its sha256
    return hashlib.sha256(password.encode()).hexdigest()


def issue(file: Path, name: str, pool: str) -> str:
    """A new random credential `name:password` for the party `name`, allowed work pool `pool`; its
    digest is added to (or replaces the party's entry in) the gateway's `file` (mode 0600)."""
    password = secrets.token_urlsafe(32)
    entries = json.loads(file.read_text()) if file.exists() else {}
    entries[name] = {"sha256": _digest(password), "pool": pool}
    write_private(json.dumps(entries, indent=1).encode(), file)
    return f"{name}:{password}"


def read_parties(file: Path) -> dict[str, Party]:
    """The gateway's parties; InputError naming the file and entry when one is malformed."""
    try:
        entries = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{file}: not a readable JSON credentials file ({error})") from None
    parties = {}
    for name, entry in entries.items() if isinstance(entries, dict) else []:
        if not (isinstance(entry, dict) and re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256")))):
            raise InputError(f"{file}: party {name!r} needs a 'sha256' (64 hex digits)")
        if not (isinstance(entry.get("pool"), str) and entry["pool"]):
            raise InputError(f"{file}: party {name!r} needs a 'pool' (its work pool's name)")
        parties[name] = Party(name, entry["sha256"], entry["pool"])
    if not parties:
        raise InputError(f"{file}: no party in it (an object of name -> {{sha256, pool}})")
    return parties


class Credentials:
    """The parties of a credentials file, read again whenever the file changes, so a re-issued
    credential replaces the old one at once; a file that turns unreadable or malformed locks
    everybody out (logged) rather than keep credentials that were meant to be revoked."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.parties = read_parties(file)  # InputError at start: the operator is told before serving
        self.version = self._version()

    def _version(self) -> tuple[int, int, int] | None:
        try:
            stat = self.file.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def current(self) -> dict[str, Party]:
        version = self._version()
        if version != self.version:
            self.version = version
            try:
                self.parties = read_parties(self.file)
            except InputError as error:
                log.error("no credential is valid until the file is fixed: %s", error)
                self.parties = {}
        return self.parties


@dataclass
class Bucket:
    """A token bucket: `take` is True while the party keeps within RATE per second (BURST saved up)."""

    tokens: float = field(default_factory=lambda: BURST)
    at: float = field(default_factory=time.monotonic)

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(BURST, self.tokens + (now - self.at) * RATE)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def authenticate(parties: dict[str, Party], auth_string: str) -> Party | None:
    """The party whose credential `auth_string` ("name:password") is, or None."""
    name, _, password = auth_string.partition(":")
    party = parties.get(name)
    digest = _digest(password)
    # compared even for an unknown name, so the time taken does not tell which names exist
    matched = hmac.compare_digest(digest, party.digest if party else "0" * 64)
    return party if party is not None and matched else None


def _basic(header: str) -> str:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        return base64.b64decode(encoded, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return ""


class Unavailable(Exception):
    """The server could not say who owns something now (an error or no answer): the party should
    retry, as it does on the server's own 5xx, rather than be refused."""


class Owner:
    """Which work pool a deployment, flow run or work queue belongs to, as the server says; an
    answer is kept for a minute (a deployment the operator moves to another pool moves with it),
    "nobody" not at all. No party can change what a flow run belongs to."""

    def __init__(self, api: httpx.AsyncClient) -> None:
        self.api = api
        self.known: TTLCache[str, str] = TTLCache(maxsize=100_000, ttl=60.0)

    async def _pool(self, kind: str, id_: Any) -> str | None:
        if not (isinstance(id_, str) and re.fullmatch(UUID, id_)):  # from the party's request: never a path
            return None
        key = f"{kind}/{id_.lower()}"
        if key in self.known:
            return self.known[key]
        try:
            response = await self.api.get(f"/{kind}/{id_}")
        except httpx.TransportError as error:
            raise Unavailable(str(error)) from error
        if response.status_code >= 500:
            raise Unavailable(f"{response.status_code} {response.text[:200]}")
        pool = response.json().get("work_pool_name") if response.status_code == 200 else None
        if isinstance(pool, str):
            self.known[key] = pool
            return pool
        return None

    async def deployment(self, id_: Any) -> str | None:
        return await self._pool("deployments", id_)

    async def work_queue(self, id_: Any) -> str | None:
        return await self._pool("work_queues", id_)

    async def flow_run(self, id_: Any) -> str | None:
        return await self._pool("flow_runs", id_)

    async def all_flow_runs(self, ids: list[Any], pool: str) -> bool:
        """Every id names one of `pool`'s flow runs; at most MAX_RUNS distinct ones, each asked of the
        server until the first that is not (a request cannot make the gateway ask the server
        without bound)."""
        if not all(isinstance(i, str) for i in ids) or len(distinct := set(ids)) > MAX_RUNS:
            return False
        for run in sorted(distinct):
            if await self.flow_run(run) != pool:
                return False
        return True


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


async def _logs_owned(owner: Owner, pool: str, body: bytes) -> bool:
    """Every log names one of `pool`'s flow runs or none (the worker's own log), and no task run."""
    logs = _json(body)
    if not isinstance(logs, list) or not all(isinstance(e, dict) and e.get("task_run_id") is None for e in logs):
        return False
    return await owner.all_flow_runs([e["flow_run_id"] for e in logs if e.get("flow_run_id") is not None], pool)


async def _flow_run_filter_owned(owner: Owner, pool: str, body: bytes) -> bool:
    """A flow-run query narrowed to ids of `pool`'s runs (a worker asks which of its runs are being
    cancelled): the server ANDs every other criterion with that, so nothing else can show."""
    query = _json(body)
    runs = query.get("flow_runs") if isinstance(query, dict) else None
    if not (isinstance(runs, dict) and isinstance(runs.get("id"), dict) and runs.get("operator", "and_") == "and_"):
        return False
    ids = runs["id"].get("any_")
    return isinstance(ids, list) and bool(ids) and await owner.all_flow_runs(ids, pool)


def _state_data_ok(body: bytes) -> bool:
    """A state without data that Prefect's server would file as an artifact under a shared key."""
    request = _json(body)
    state = request.get("state") if isinstance(request, dict) else None
    data = state.get("data") if isinstance(state, dict) else None
    return not (isinstance(data, dict) and ARTIFACT_FIELDS & data.keys())


def _path_pool(owner: Owner, match: re.Match[str]) -> Awaitable[str | None]:
    async def named() -> str | None:
        return match["pool"]

    return named()


# (method, path under /api, whose pool the request touches): the calls a process worker and the flow
# runs it starts make (observed on Prefect 3.9 by running deployed rounds through this gateway).
PathRule = Callable[[Owner, re.Match[str]], Awaitable[str | None]]
BodyRule = Callable[[Owner, str, bytes], Awaitable[bool]]
OPEN: list[tuple[str, str]] = [
    ("GET", r"/health"),
    ("GET", r"/admin/version"),
    ("GET", r"/csrf-token"),  # a token for the caller's own client id, which its changes must carry
    ("GET", r"/admin/storage"),  # the id of the server's default result storage (none here), not its contents
    ("GET", r"/flows/" + UUID),  # a flow's name
]
BY_PATH: list[tuple[str, str, PathRule]] = [
    ("GET", r"/work_pools/(?P<pool>[^/]+)", _path_pool),
    ("POST", r"/work_pools/(?P<pool>[^/]+)/workers/heartbeat", _path_pool),
    ("POST", r"/work_pools/(?P<pool>[^/]+)/get_scheduled_flow_runs", _path_pool),
    ("POST", r"/work_pools/(?P<pool>[^/]+)/queues/filter", _path_pool),
    ("GET", rf"/work_queues/(?P<id>{UUID})", lambda owner, m: owner.work_queue(m["id"])),
    ("GET", rf"/deployments/(?P<id>{UUID})", lambda owner, m: owner.deployment(m["id"])),
    ("GET", rf"/flow_runs/(?P<id>{UUID})", lambda owner, m: owner.flow_run(m["id"])),
    ("PATCH", rf"/flow_runs/(?P<id>{UUID})", lambda owner, m: owner.flow_run(m["id"])),
    ("PATCH", rf"/flow_runs/(?P<id>{UUID})/labels", lambda owner, m: owner.flow_run(m["id"])),
    ("POST", rf"/flow_runs/(?P<id>{UUID})/set_state", lambda owner, m: owner.flow_run(m["id"])),
]
BY_BODY: list[tuple[str, str, BodyRule]] = [
    ("POST", r"/logs/?", _logs_owned),
    ("POST", r"/flow_runs/filter", _flow_run_filter_owned),
]


async def refusal(owner: Owner, party: Party, method: str, path: str, body: bytes) -> str | None:
    """Why `party` may not make this call (None: it may). `path` is under /api."""
    if any(m == method and re.fullmatch(p, path) for m, p in OPEN):
        return None
    for rule_method, pattern, pool_of in BY_PATH:
        if rule_method == method and (match := re.fullmatch(pattern, path)):
            if path.endswith("/set_state") and not _state_data_ok(body):
                return f"a state's data may not name an artifact ({', '.join(sorted(ARTIFACT_FIELDS))})"
            pool = await pool_of(owner, match)
            return None if pool == party.pool else f"{party.name} may act on work pool {party.pool} only"
    for rule_method, pattern, owned in BY_BODY:
        if rule_method == method and re.fullmatch(pattern, path):
            ok = await owned(owner, party.pool, body)
            return None if ok else f"{party.name} may name its own work pool's runs only"
    return f"{method} {path} is not a call a client organization's worker makes"


def app(
    upstream: str, admin_auth: str, credentials: Credentials, transport: httpx.AsyncBaseTransport | None = None
) -> Starlette:
    """The gateway in front of the Prefect API at `upstream` (".../api"); `transport`: how it reaches
    the server (httpx's default, or a test's)."""
    api = httpx.AsyncClient(
        transport=transport,
        base_url=upstream.rstrip("/"),
        headers=basic_auth_header(admin_auth),
        timeout=httpx.Timeout(60.0),
    )
    owner = Owner(api)
    buckets: dict[str, Bucket] = {}

    def within_rate(party: Party) -> bool:
        return buckets.setdefault(party.name, Bucket()).take()

    async def forward(request: Request) -> Response:
        party = authenticate(credentials.current(), _basic(request.headers.get("authorization", "")))
        if party is None:
            return JSONResponse({"detail": "a party's credential is required"}, 401, {"WWW-Authenticate": "Basic"})
        if not within_rate(party):
            return JSONResponse({"detail": f"over {RATE:g} requests per second"}, 429, {"Retry-After": "1"})
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return JSONResponse({"detail": f"a request body over {MAX_BODY} bytes"}, 413)
        path = "/" + request.path_params["path"]
        try:
            reason = await refusal(owner, party, request.method, path, body)
        except Unavailable as error:
            return JSONResponse({"detail": f"the Prefect server did not answer: {error}"}, 503)
        if reason is not None:
            log.warning("refused %s %s %s: %s", party.name, request.method, path, reason)
            return JSONResponse({"detail": reason}, 403)
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED}
        try:
            answer = await api.request(request.method, path, params=request.query_params, content=body, headers=headers)
        except httpx.TransportError as error:
            return JSONResponse({"detail": f"the Prefect server did not answer: {error}"}, 502)
        kept = {k: v for k, v in answer.headers.items() if k.lower() == "content-type"}
        return Response(answer.content, answer.status_code, kept)

    async def events_in(socket: WebSocket) -> None:
        """Prefect's event stream in: handshake with the party's own credential within HELLO_S, then
        each text frame is an event for `deliver`; anything else is ignored."""
        await socket.accept(subprotocol="prefect")
        try:
            hello = await asyncio.wait_for(socket.receive_json(), HELLO_S)
            token = hello.get("token") if isinstance(hello, dict) and hello.get("type") == "auth" else None
            token = token if isinstance(token, str) else ""
            party = authenticate(credentials.current(), token)
            if party is None:
                await socket.close(1008, "a party's credential is required")
                return
            await socket.send_json({"type": "auth_success"})
            while (message := await socket.receive())["type"] == "websocket.receive":
                if authenticate(credentials.current(), token) != party:  # re-issued or revoked since
                    break
                if isinstance(message.get("text"), str) and within_rate(party):
                    await deliver(party, _json(message["text"].encode()))
        except (WebSocketDisconnect, ValueError, KeyError, TimeoutError):
            pass
        with contextlib.suppress(RuntimeError):
            await socket.close(1008)

    async def deliver(party: Party, event: Any) -> None:
        """`event` on to the server, without its related resources, if it is a flow-run event
        (`prefect.flow-run.*`: the server's task-run recorder takes any other `prefect.task-run.*`
        and chokes on one about a flow run) about one of `party`'s flow runs; dropped otherwise,
        and when the server cannot say whose run it is now (events are best effort in Prefect too)."""
        resource = event.get("resource") if isinstance(event, dict) else None
        named = resource.get("prefect.resource.id") if isinstance(resource, dict) else None
        kind, _, id_ = named.rpartition(".") if isinstance(named, str) else ("", "", "")
        name = event.get("event") if isinstance(event, dict) else None
        try:
            if (
                kind == "prefect.flow-run"
                and isinstance(name, str)
                and name.startswith("prefect.flow-run.")
                and await owner.flow_run(id_) == party.pool
            ):
                await api.post("/events", content=json.dumps([{**event, "related": []}]))
                return
        except (Unavailable, httpx.TransportError):
            pass
        log.info("dropped %s's event about %s", party.name, named if isinstance(named, str) else "nothing")

    def declined(reason: str) -> Callable[[WebSocket], Awaitable[None]]:
        """A websocket route closed with 1008 (policy) and `reason`: Prefect's clients take it as final
        (an unrouted socket would get a bare 403, logged as a rejected call)."""

        async def close(socket: WebSocket) -> None:
            await socket.accept(subprotocol="prefect")
            await socket.close(1008, reason)

        return close

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await api.aclose()

    methods = ["GET", "POST", "PATCH", "PUT", "DELETE"]
    return Starlette(
        routes=[
            WebSocketRoute("/api/events/in", events_in),
            WebSocketRoute(
                "/api/events/out",
                declined("the event stream shows every party's events: not served to client organizations"),
            ),
            # Prefect 3.9's worker channel: its frames are outside this gateway's rules; the worker
            # then heartbeats over HTTP, which the gateway scopes
            WebSocketRoute(
                "/api/work_pools/{pool}/workers/connect",
                declined("the worker channel is not served to client organizations: heartbeat over HTTP"),
            ),
            Route("/api/{path:path}", forward, methods=methods),
        ],
        lifespan=lifespan,
    )


def serve(upstream: str, admin_auth: str, credentials: Credentials, host: str, port: int) -> None:
    """Run the gateway until stopped (uvicorn, one process)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(uvicorn.Server(uvicorn.Config(app(upstream, admin_auth, credentials), host, port)).serve())
