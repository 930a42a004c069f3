"""`python -m deploy up`: a whole federation on this machine, as several organizations would run it.

Starts the Prefect server (API auth on), the gateway that client organizations reach it through
(one credential each, deploy/gateway.py) and the MLflow tracking server (database store, proxied
artifacts, basic auth), gives every client organization its own folder with only its partition,
creates a work pool per party, runs `prefect deploy --all`, starts one confined worker per party,
prints where to go, and keeps everything running until Ctrl-C. Credentials come from the
environment only (FEDTUNE_PREFECT_AUTH, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from deploy.secrets import mlflow_credentials, prefect_auth
from fedtune.core.errors import InputError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Operate a real multi-party federation.")
console = Console()


@app.callback()
def main() -> None:
    """Operate a real multi-party federation (`up` starts one on this machine; `identity` makes a
    client's signing key on its own machine)."""
    # a callback keeps `up` a named subcommand: with one command and no callback, Typer makes the
    # command the app itself and `python -m deploy up` is refused (rel-15)


@app.command()
def up(
    config: Annotated[Path, typer.Option("--config", "-c", help="params.yaml to read.")] = Path("params.yaml"),
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: dotted.key=value.")] = None,
    root: Annotated[Path, typer.Option(help="Where the parties' folders, servers' stores and logs go.")] = Path(
        "outputs/deployment"
    ),
    host: Annotated[str, typer.Option(help="Address the servers listen on.")] = "127.0.0.1",
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
) -> None:
    """Servers, parties, pools, deployments and workers; then wait until Ctrl-C and stop them all."""
    # imported here: `gateway` and `credential` need neither torch nor the data pipeline
    from deploy.federation import distribute_from, running
    from fedtune.config.schema import load_config
    from fedtune.model.loading import ensure_model

    try:
        prefect_auth(), mlflow_credentials()  # refuse to run servers without auth, before any work
        cfg = load_config(config, set_ or [])
        model_dir = Path(ensure_model(cfg.model))
        source = distribute_from(cfg)
    except InputError as error:
        console.print(f"[red]{error}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None
    with running(cfg, root, model_dir, source, host=host, prefect_port=prefect_port, mlflow_port=mlflow_port) as fed:
        api, logs = fed.prefect.url, fed.layout.root / "logs"
        console.print(
            f"Prefect UI  {api.removesuffix('/api')}  (log in with FEDTUNE_PREFECT_AUTH)\n"
            f"MLflow UI   {fed.mlflow.url}  (MLFLOW_TRACKING_USERNAME / _PASSWORD)\n"
            f"gateway     {fed.gateway.url}  (client organizations' API, one credential each, in their profiles)\n"
            f"workers     coordinator + {len(fed.workers) - 1} clients, logs in {logs}\n"
            "start a run from the UI (Deployments > federated-finetune/coordinator > Run), or:\n"
            f"  PREFECT_API_URL={api} PREFECT_API_AUTH_STRING=... \\\n"
            "  prefect deployment run federated-finetune/coordinator\n"
            "Ctrl-C stops everything."
        )
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                for name, worker in fed.workers.items():
                    if worker.poll() is not None:
                        raise RuntimeError(f"the {name} worker exited with {worker.returncode}; see {logs}")
        except KeyboardInterrupt:
            pass


@app.command()
def gateway(
    credentials: Annotated[Path, typer.Argument(help="The parties' credentials file (`python -m deploy credential`).")],
    upstream: Annotated[
        str, typer.Option(help="The Prefect API the gateway forwards to.")
    ] = "http://127.0.0.1:4200/api",
    host: Annotated[str, typer.Option(help="Address the gateway listens on.")] = "127.0.0.1",
    port: int = 4300,
) -> None:
    """Serve the Prefect API to client organizations, each with its own credential and its own work
    pool only (deploy/gateway.py); forwards with the server's auth string (FEDTUNE_PREFECT_AUTH)."""
    from deploy.gateway import Credentials, serve

    try:
        admin, parties = prefect_auth(), Credentials(credentials)
    except InputError as error:
        console.print(f"[red]{error}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None
    serve(upstream, admin, parties, host, port)


@app.command()
def credential(
    credentials: Annotated[Path, typer.Argument(help="The gateway's credentials file (created if missing).")],
    party: Annotated[str, typer.Argument(help="The client organization's name, e.g. client-0.")],
    pool: Annotated[str | None, typer.Option(help="Its work pool (default: the party's name).")] = None,
) -> None:
    """A new credential for PARTY: its digest goes into CREDENTIALS, the credential itself (user:password)
    is printed once, for the party's PREFECT_API_AUTH_STRING. A second call replaces the first (a running
    gateway reads the file again when it changes)."""
    from deploy.gateway import issue

    print(issue(credentials, party, pool or party))


@app.command()
def identity(
    private_dir: Annotated[Path, typer.Argument(help="The client organization's private folder.")],
) -> None:
    """A client's signing key on separate machines: writes it into PRIVATE_DIR (mode 0600) and prints
    the public key (base64), which the coordinator adds to its deployment.client_keys file as
    {"<client id>": "<public key>"}. `up` does this for every client on one machine."""
    import base64

    from fedtune.deployment.signing import IDENTITY, provision_identity

    if (private_dir / IDENTITY).exists():  # a new key would orphan the one the coordinator holds
        console.print(f"[red]{private_dir / IDENTITY} exists; move it away to make a new key[/red]")
        raise typer.Exit(2)
    private_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    print(base64.b64encode(provision_identity(private_dir)).decode())


if __name__ == "__main__":
    app()
