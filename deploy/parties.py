"""The parties of a one-machine federation: their folders, work pools, deployments and workers.

Each client organization gets a home holding only its own partition, a private folder and its
signing key; the coordinator gets only the held-out test set and the clients' public keys. Every
worker runs as its party's own unprivileged user (uid `PARTY_UID` + n, no other groups, no new
privileges), in its own PID namespace with its own /proc (no other party's process, environment
or root directory is visible) and in a mount namespace where the other parties' folders, the
servers' stores and the undistributed data are covered by an empty, unreadable tmpfs. Files are
owned per party (homes 0700; client c's outbox writable by c and readable by the coordinator's
group only; the server's readable by all, writable by the coordinator only), and secrets reach a
worker as files only it can read (its Prefect profile, the coordinator's MLflow credentials file),
never in its environment. So the kernel enforces the isolation through permissions a party's own
code cannot drop (rel-16). On separate machines (docs/deployment.md) each party simply has only
its own disk.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deploy.secrets import MLFLOW_PASSWORD, MLFLOW_USER, mlflow_credentials, prefect_auth
from deploy.servers import BIN, spawn
from fedtune.core.atomic import write_private
from fedtune.core.faults import CRASH_AT
from fedtune.data.partition import client_dir
from fedtune.deployment.exchange import SERVER, outbox
from fedtune.deployment.signing import provision_identity, write_public_keys

COORDINATOR_POOL = "coordinator"
HEARTBEAT_S = 10  # 5 s: a live worker on a loaded 2-core CI machine went 15 s without one (3 missed)
QUERY_S = 1
# the parties' users: the coordinator PARTY_UID, client c PARTY_UID + 1 + c (uid = gid; ids no account
# on a normal machine uses, so no passwd entry is needed or touched)
PARTY_UID = 61000


# what a worker inherits of the operator's environment: nothing else (no cloud or hub token, no secret)
WORKER_ENV = {"PATH", "LANG", "TZ", "TMPDIR", "PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}
WORKER_ENV |= {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "TOKENIZERS_PARALLELISM"}


@dataclass(frozen=True)
class Access:
    """Where each party's Prefect client connects, with which credential: the coordinator to the
    server with its auth string, client c to the gateway (deploy/gateway.py) with its own."""

    server: str
    gateway: str
    credentials: dict[int, str]  # client -> "client-c:password"

    def url(self, client: int | None) -> str:
        return self.server if client is None else self.gateway

    def auth(self, client: int | None) -> str:
        return prefect_auth() if client is None else self.credentials[client]


def issue_credentials(file: Path, clients: int) -> dict[int, str]:
    """A new gateway credential per client organization, allowed its own work pool only."""
    from deploy.gateway import issue

    return {c: issue(file, client_pool(c), client_pool(c)) for c in range(clients)}


def party_id(client: int | None) -> int:
    """The uid (and gid) of client `client`'s worker, or of the coordinator's (None)."""
    return PARTY_UID if client is None else PARTY_UID + 1 + client


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
    # the coordinator's home outlives a restart (its runs resume from it) and its party could have left
    # links there: what root writes into it replaces such a link instead of writing through it
    partitions = _unlinked(layout.coordinator / "partitions")
    partitions.mkdir(parents=True, exist_ok=True)
    write_public_keys(public_keys, _unlinked(layout.client_keys))
    shutil.copy2(partitions_dir / "test.jsonl", _unlinked(partitions / "test.jsonl"))
    for box in [SERVER, *(outbox(c) for c in range(clients))]:
        (layout.exchange / box).mkdir(parents=True, exist_ok=True)  # each hidden from the other clients
    return layout


def exposing(needed: list[Path], stage: Path) -> list[str]:
    """Shell commands that make each folder of `needed` reachable by an unprivileged user although an
    ancestor is not (the interpreter under root's 0700 home, say): in the worker's own mount namespace
    that ancestor is covered by an empty tmpfs and only the needed folders are bound back into it,
    so nothing else of it shows. `stage` is an empty folder outside every such ancestor."""
    blocked: dict[Path, list[Path]] = {}
    for path in {p.resolve() for p in needed}:
        stop = next((a for a in reversed(path.parents) if not a.stat().st_mode & stat.S_IXOTH), None)
        if stop is not None:
            blocked.setdefault(stop, []).append(path)
    q, commands = shlex.quote, []
    for n, (ancestor, paths) in enumerate(sorted(blocked.items())):
        kept = [stage / f"{n}-{m}" for m in range(len(paths))]
        for path, keep in zip(sorted(paths), kept, strict=True):
            commands += [f"mkdir -p {q(str(keep))}", f"mount --bind {q(str(path))} {q(str(keep))}"]
        commands.append(f"mount -t tmpfs -o mode=0755,size=64k exposed {q(str(ancestor))}")
        for path, keep in zip(sorted(paths), kept, strict=True):
            commands += [f"mkdir -p {q(str(path))}", f"mount --bind {q(str(keep))} {q(str(path))}"]
    return commands


def confined(command: list[str], hidden: list[Path], uid: int, exposed: list[str] | None = None) -> list[str]:
    """`command` as user `uid` (gid `uid`, no other group, no new privileges) in its own PID namespace
    with its own /proc, and a private mount namespace where the `exposed` commands have run (see
    `exposing`) and every folder in `hidden` looks empty."""
    if os.geteuid() != 0:
        raise PermissionError(
            "isolating the parties on one machine needs root (namespaces, a user per party); use one "
            "machine per party, or run as root"
        )
    hidden = [p for p in hidden if not any(p != q and p.is_relative_to(q) for q in hidden)]  # covered already
    # a hidden folder that an exposure's cover already took out of sight needs no cover of its own
    covers = [
        f"{{ [ ! -e {q} ] || mount -t tmpfs -o ro,mode=000,size=4k hidden {q}; }}"
        for q in map(shlex.quote, map(str, hidden))
    ]
    mounts = " && ".join([*(exposed or []), *covers])
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs", "--"]
    namespaces = ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private"]
    return [*namespaces, "sh", "-c", f'{mounts or "true"} && exec "$@"', "sh", *drop, *command]


def _own(path: Path, uid: int, gid: int | None = None, mode: int = 0o700) -> None:
    """`path` and everything under it owned by `uid` (group `gid`, default `uid`); `path` gets `mode`."""
    for folder, dirs, files in os.walk(path):
        for name in [folder, *(os.path.join(folder, d) for d in dirs), *(os.path.join(folder, f) for f in files)]:
            os.chown(name, uid, uid if gid is None else gid, follow_symlinks=False)
    os.chmod(path, mode)


def _unlinked(path: Path) -> Path:
    """`path` with whatever link or file stood there removed (never followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    return path


def _secret_file(path: Path, text: str, uid: int) -> None:
    """`text` in a new file only `uid` can read (`write_private`: a link its party left is not followed)."""
    write_private(text.encode(), path)
    os.chown(path.parent, uid, uid, follow_symlinks=False)
    os.chown(path, uid, uid, follow_symlinks=False)


def hand_over(layout: Layout, clients: int, access: Access, stores: list[Path]) -> None:
    """Give every party its files and secrets (see the module docstring); the servers' `stores` and
    the federation's root stay root's. Runs after `deploy_all`, which writes as root."""
    coordinator = party_id(None)
    for folder in (layout.root, layout.root / "clients", layout.exchange):  # ours; never the user's --root
        os.chmod(folder, 0o711)  # traversable, not listable, by the parties
    for store in stores:
        store.mkdir(parents=True, exist_ok=True)
        os.chmod(store, 0o700)
    _own(layout.coordinator, coordinator)
    _own(layout.exchange / SERVER, coordinator, mode=0o755)
    user, password = mlflow_credentials()
    _secret_file(
        layout.coordinator / ".mlflow" / "credentials",  # MLflow's own credentials file, read through HOME
        f"[mlflow]\n{MLFLOW_USER.lower()} = {user}\n{MLFLOW_PASSWORD.lower()} = {password}\n",
        coordinator,
    )
    for client in range(clients):
        _own(layout.client_home(client), party_id(client))
        # setgid: what the client writes stays readable by the coordinator's group, by nobody else
        _own(layout.exchange / outbox(client), party_id(client), coordinator, mode=0o2750)
    parties: list[tuple[int | None, Path]] = [(None, layout.coordinator)]
    for party, home in parties + [(c, layout.client_home(c)) for c in range(clients)]:
        profile = f'active = "fedtune"\n\n[profiles.fedtune]\nPREFECT_API_URL = "{access.url(party)}"\n'
        profile += f'PREFECT_API_AUTH_STRING = "{access.auth(party)}"\n'
        _secret_file(home / ".prefect" / "profiles.toml", profile, party_id(party))


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
    """A process work pool per party (a real organization would pick docker or kubernetes), with the
    process worker's job template in place: a worker that finds none writes it, and client workers
    may not change their pool (deploy/gateway.py)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    with SyncPrefectClient(api_url, auth_string=prefect_auth()) as api:
        for pool in [COORDINATOR_POOL, *(client_pool(c) for c in range(clients))]:
            api.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template), overwrite=True)


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
    api_url: str,
    layout: Layout,
    pool: str,
    env_extra: dict[str, str],
    hidden: list[Path],
    log: Path,
    uid: int,
    exposed: list[str],
) -> subprocess.Popen[bytes]:
    home = Path(env_extra.get("FEDTUNE_CLIENT_HOME", layout.coordinator))
    kept = {k: v for k, v in prefect_env(api_url, home).items() if k in WORKER_ENV or k.startswith(("LC_", "PREFECT_"))}
    env = {
        **kept,
        # a heartbeat every HEARTBEAT_S: the coordinator drops a client whose workers all missed three
        # (flows/remote_clients.py) instead of waiting for its deadline; Prefect's default is 30 s
        "PREFECT_WORKER_HEARTBEAT_SECONDS": str(HEARTBEAT_S),
        # each round's client flow runs start within QUERY_S of being created (Prefect's default, 10 s,
        # added up to 10 s of idle waiting to every round); a handful of workers polling is no load
        "PREFECT_WORKER_QUERY_SECONDS": str(QUERY_S),
        "HOME": str(home),  # caches, and the coordinator's ~/.mlflow/credentials
        "USER": pool,
        "LOGNAME": pool,
        **env_extra,
    }
    del env["PREFECT_API_AUTH_STRING"]  # in the party's own profile (`hand_over`), not in its environment
    command = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
    return spawn(pool, confined(command, hidden, uid, exposed), env, log)


def start_workers(
    access: Access,
    layout: Layout,
    clients: int,
    source_data: list[Path],
    stores: list[Path],
    exposed: list[str],
    drills: dict[int, str] | None = None,
) -> dict[str, subprocess.Popen[bytes]]:
    """One worker per party; each sees its own folder, the model and the exchange, nothing else (not
    the undistributed `source_data`, not the servers' `stores`); `exposed`: see `exposing`.

    `drills` maps a client to a crash point (`fedtune.core.faults`, e.g. `secagg-shared:1`) at which
    its flow runs kill themselves: a fault drill for the federation's dropout handling."""
    homes = [layout.client_home(c) for c in range(clients)]
    workers = {
        COORDINATOR_POOL: start_worker(
            access.url(None),
            layout,
            COORDINATOR_POOL,
            {},
            [*homes, *source_data, *stores],
            layout.root / "logs" / "coordinator.log",
            party_id(None),
            exposed,
        )
    }
    for client, home in enumerate(homes):
        workers[client_pool(client)] = start_worker(
            access.url(client),
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
                *stores,
            ],
            layout.root / "logs" / f"client-{client}.log",
            party_id(client),
            exposed,
        )
    return workers


def stop(worker: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker's process group: the worker and the flow runs it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)
