"""The parties of a one-machine federation: their folders, work pools, deployments and workers.

Each client organization gets a home holding only its own partition and a private folder; the
coordinator gets only the held-out test set. Every worker runs in a mount namespace where the
other parties' folders (and the undistributed source data) are covered by an empty, unreadable
tmpfs, so the isolation is enforced by the kernel, not by our code's good behaviour. On separate
machines (docs/deployment.md) the same roles need no namespaces: each party simply has only its
own disk.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deploy.secrets import MLFLOW_PASSWORD, MLFLOW_USER, prefect_auth
from deploy.servers import BIN, spawn
from fedtune.core.faults import CRASH_AT
from fedtune.data.partition import client_dir
from fedtune.deployment.exchange import SERVER, outbox
from fedtune.deployment.signing import provision_identity, write_public_keys

COORDINATOR_POOL = "coordinator"
HEARTBEAT_S = 5


def client_pool(client: int) -> str:
    return f"client-{client}"


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def exchange(self) -> Path:
        return self.root / "exchange"

    @property
    def coordinator(self) -> Path:
        return self.root / "coordinator"

    def client_home(self, client: int) -> Path:
        return self.root / "clients" / f"client_{client}"

    @property
    def client_keys(self) -> Path:
        """Every client's Ed25519 public key, which the coordinator verifies their messages with."""
        return self.coordinator / "client_keys.json"


def provision(partitions_dir: Path, root: Path, clients: int) -> Layout:
    """Give each client its own partition and signing key, the coordinator the test set and the
    clients' public keys only."""
    layout = Layout(root.resolve())
    public_keys = {}
    for client in range(clients):
        home = layout.client_home(client)
        shutil.rmtree(home, ignore_errors=True)
        shutil.copytree(client_dir(partitions_dir, client), client_dir(home / "partitions", client))
        (home / "private").mkdir(parents=True, mode=0o700)
        public_keys[client] = provision_identity(home / "private")
    (layout.coordinator / "partitions").mkdir(parents=True, exist_ok=True)
    write_public_keys(public_keys, layout.client_keys)
    shutil.copy2(partitions_dir / "test.jsonl", layout.coordinator / "partitions" / "test.jsonl")
    for box in [SERVER, *(outbox(c) for c in range(clients))]:
        (layout.exchange / box).mkdir(parents=True, exist_ok=True)  # each hidden from the other clients
    return layout


def confined(command: list[str], hidden: list[Path]) -> list[str]:
    """`command` in a private mount namespace where every folder in `hidden` looks empty."""
    if os.geteuid() != 0:
        raise PermissionError(
            "isolating the parties on one machine needs root (mount namespaces); use one machine "
            "per party, or run as root"
        )
    hidden = [p for p in hidden if not any(p != q and p.is_relative_to(q) for q in hidden)]  # covered already
    mounts = " && ".join(f"mount -t tmpfs -o ro,mode=000,size=4k hidden {shlex.quote(str(p))}" for p in hidden)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh", *command]


def prefect_env(api_url: str, home: Path) -> dict[str, str]:
    """The environment every party's Prefect process needs, without anybody else's secrets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDTUNE_", "MLFLOW_TRACKING_", "PREFECT_"))}
    return {
        **env,
        "PREFECT_API_URL": api_url,
        "PREFECT_API_AUTH_STRING": prefect_auth(),
        "PREFECT_HOME": str(home / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TOKENIZERS_PARALLELISM": "false",
    }


def prefect(args: list[str], env: dict[str, str], cwd: Path | None = None) -> str:
    done = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def create_pools(api_url: str, clients: int) -> None:
    """A process work pool per party (a real organization would pick docker or kubernetes)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate

    with SyncPrefectClient(api_url, auth_string=prefect_auth()) as api:
        for pool in [COORDINATOR_POOL, *(client_pool(c) for c in range(clients))]:
            api.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)


def deployment_file(repo: Path, clients: int, out: Path, config: dict[str, Any] | None = None) -> Path:
    """prefect.yaml with one client deployment per client (the committed file lists three) and,
    when given, `config` as the coordinator's and the continual schedule's default parameters."""
    spec = yaml.safe_load((repo / "prefect.yaml").read_text())
    template = next(d for d in spec["deployments"] if d["name"] == "client-0")
    others = [d for d in spec["deployments"] if not d["name"].startswith("client-")]
    if config is not None:
        others = [{**d, "parameters": {**d.get("parameters", {}), "config": config}} for d in others]
    spec["deployments"] = others + [
        {**template, "name": f"client-{c}", "work_pool": {**template["work_pool"], "name": client_pool(c)}}
        for c in range(clients)
    ]
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def deploy_all(
    api_url: str,
    repo: Path,
    layout: Layout,
    clients: int,
    mlflow_url: str,
    model_dir: Path,
    config: dict[str, Any] | None = None,
) -> str:
    """`prefect deploy --all`: the coordinator, the continual-learning schedule and every client."""
    env = {
        **prefect_env(api_url, layout.coordinator),
        "FEDTUNE_REPO": str(repo.resolve()),
        "FEDTUNE_DEPLOY_ROOT": str(layout.root),
        "FEDTUNE_MLFLOW_URL": mlflow_url,
        "FEDTUNE_MODEL_DIR": str(model_dir.resolve()),
    }
    spec = deployment_file(repo, clients, layout.root / "prefect.yaml", config)
    return prefect(["--no-prompt", "deploy", "--all", "--prefect-file", str(spec)], env, cwd=repo)


def start_worker(
    api_url: str, layout: Layout, pool: str, env_extra: dict[str, str], hidden: list[Path], log: Path
) -> subprocess.Popen[bytes]:
    home = Path(env_extra.get("FEDTUNE_CLIENT_HOME", layout.coordinator))
    # a heartbeat every HEARTBEAT_S: the coordinator drops a client whose workers all missed three
    # (flows/remote_clients.py) instead of waiting for its deadline; Prefect's default is 30 s
    env = {**prefect_env(api_url, home), "PREFECT_WORKER_HEARTBEAT_SECONDS": str(HEARTBEAT_S), **env_extra}
    command = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
    return spawn(pool, confined(command, hidden), env, log)


def start_workers(
    api_url: str, layout: Layout, clients: int, source_data: list[Path], drills: dict[int, str] | None = None
) -> dict[str, subprocess.Popen[bytes]]:
    """One worker per party; each sees its own folder, the model and the exchange, nothing else.

    `drills` maps a client to a crash point (`fedtune.core.faults`, e.g. `secagg-shared:1`) at which
    its flow runs kill themselves: a fault drill for the federation's dropout handling."""
    homes = [layout.client_home(c) for c in range(clients)]
    workers = {
        COORDINATOR_POOL: start_worker(
            api_url,
            layout,
            COORDINATOR_POOL,
            {MLFLOW_USER: os.environ.get(MLFLOW_USER, ""), MLFLOW_PASSWORD: os.environ.get(MLFLOW_PASSWORD, "")},
            [*homes, *source_data],
            layout.root / "logs" / "coordinator.log",
        )
    }
    for client, home in enumerate(homes):
        workers[client_pool(client)] = start_worker(
            api_url,
            layout,
            client_pool(client),
            {
                "FEDTUNE_CLIENT_ID": str(client),
                "FEDTUNE_CLIENT_HOME": str(home),
                **({CRASH_AT: drills[client]} if drills and client in drills else {}),
            },
            [
                *(h for h in homes if h != home),
                *(layout.exchange / outbox(c) for c in range(clients) if c != client),
                layout.coordinator,
                *source_data,
            ],
            layout.root / "logs" / f"client-{client}.log",
        )
    return workers


def stop(worker: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker's process group: the worker and the flow runs it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)
