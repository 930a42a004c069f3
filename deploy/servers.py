"""The Prefect API server, its gateway for client organizations (deploy/gateway.py) and the MLflow
tracking server, each refusing unauthenticated requests.

Prefect: `prefect server start` with PREFECT_SERVER_API_AUTH_STRING (HTTP basic auth on the API
and a login prompt in the UI). MLflow: `mlflow server --app-name basic-auth` with a SQLite
database, proxied artifacts (clients need HTTP access only) and its admin created from the
environment's credentials on first start.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from deploy.secrets import mlflow_credentials, prefect_auth

BIN = Path(sys.executable).parent
MLFLOW_AUTH_CACHE_S = 60


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def basic_auth_header(user_password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(user_password.encode()).decode()}


def status_of(url: str, headers: dict[str, str] | None = None, timeout_s: float = 30.0) -> int:
    """HTTP status of a GET (errors included), or 0 if nothing answers within `timeout_s` (MLflow's
    basic auth hashes the password on every request: seconds on a loaded 2-core machine)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def _wait_ready(server: Server, probe: str, headers: dict[str, str], deadline_s: float, expect: int = 200) -> Server:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}; see {server.log}")
        if status_of(probe, headers) == expect:
            return server
        time.sleep(0.5)
    server.stop()
    raise TimeoutError(f"{server.name} did not answer at {probe} within {deadline_s:g} s; see {server.log}")


def spawn(name: str, command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as sink:
        return subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def start_prefect(home: Path, port: int, host: str = "127.0.0.1", deadline_s: float = 120) -> Server:
    auth = prefect_auth()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_API_AUTH_STRING": auth,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_UI_API_URL": f"http://{host}:{port}/api",  # where the browser's UI calls the API
    }
    env.pop("PREFECT_API_URL", None)
    command = [str(BIN / "prefect"), "server", "start", "--host", host, "--port", str(port)]
    url = f"http://{host}:{port}/api"
    server = Server("prefect", url, spawn("prefect", command, env, home / "server.log"), home / "server.log")
    return _wait_ready(server, f"{url}/admin/version", basic_auth_header(auth), deadline_s)  # /health is open


def start_gateway(
    upstream: str, credentials: Path, port: int, host: str = "127.0.0.1", deadline_s: float = 60.0
) -> Server:
    """The Prefect API gateway (deploy/gateway.py) in front of `upstream`; `credentials` must list at
    least one party (the readiness probe authenticates as a party no file lists, expecting 401)."""
    command = [sys.executable, "-m", "deploy", "gateway", str(credentials), "--upstream", upstream]
    command += ["--host", host, "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "PREFECT_API"))}
    log = credentials.parent / "gateway.log"
    server = Server("gateway", f"http://{host}:{port}/api", spawn("gateway", command, env, log), log)
    return _wait_ready(server, f"{server.url}/health", {}, deadline_s, expect=401)


def start_mlflow(root: Path, port: int, host: str = "127.0.0.1", deadline_s: float = 120) -> Server:
    user, password = mlflow_credentials()
    root.mkdir(parents=True, exist_ok=True)
    config = root / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{root.resolve()}/basic_auth.db\n"
        f"admin_username = {user}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # MLflow's own credential cache (off by default): a password is checked with scrypt once a
        # minute, not on every request (MLflow hashed it two or three times a request, 62 ms each).
        # Failures are never cached; a password changed or a user deleted through the API takes
        # effect at once (one worker); only changes made directly in the database wait out the minute
        f"auth_cache_ttl_seconds = {MLFLOW_AUTH_CACHE_S}\n"
    )
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        # signs the UI's session cookies; a new one per start only logs browsers out
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or secrets.token_hex(32),
        # MLflow 3's job runner (seven worker processes for its GenAI scorers, which a federation does not
        # use) only costs memory and start-up CPU; an operator who wants it sets the variable
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
    }
    command = [
        str(BIN / "mlflow"),
        "server",
        "--app-name",
        "basic-auth",
        "--backend-store-uri",
        f"sqlite:///{root.resolve()}/mlflow.db",
        "--artifacts-destination",
        str((root / "artifacts").resolve()),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    url = f"http://{host}:{port}"
    server = Server("mlflow", url, spawn("mlflow", command, env, root / "server.log"), root / "server.log")
    probe = f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    return _wait_ready(server, probe, basic_auth_header(f"{user}:{password}"), deadline_s)
