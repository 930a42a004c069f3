"""How often a run submitted the way Prefect's UI submits it fails with 503, by how often the
parties' workers ask for scheduled runs.

    python benchmarks/prefect_submit_collisions.py [--submissions 60] [--workers 4] [--load 5]

The one-machine Prefect server keeps its state in SQLite. Creating a run from a deployment reads
the deployment and then writes the run in one deferred transaction; a write that commits in
between makes SQLite refuse the upgrade at once (SQLITE_BUSY, no busy wait), which the API
answers with 503. Every worker poll is followed by two writes (its queues and deployments marked
ready), so the more often workers poll, the more submissions collide. Prefect's Python client
retries a 503; the UI shows "Something went wrong trying to create a flow run" instead.

For each poll interval (Prefect's default of 10 s, the baseline, and fedtune's 1 s,
`deploy/parties.py::QUERY_S`) a fresh server as `deploy/servers.py` starts it, `--workers` process
workers on their own pools with the product's heartbeat, and `--load` busy processes (a loaded
2-core CI machine); then `--submissions` POSTs of `/deployments/{id}/create_flow_run`, no
retries, half a second apart. Writes benchmarks/results/prefect_submit_collisions.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import httpx
from common import save_results

from deploy import parties, servers

BASELINE_QUERY_S = 10.0  # Prefect's PREFECT_WORKER_QUERY_SECONDS default


def _spin() -> None:
    while True:
        pass


def collisions(query_s: float, workers: int, load: int, submissions: int) -> int:
    """How many of `submissions` run creations the server answered with 503."""
    home = Path(tempfile.mkdtemp(prefix="fedtune-collisions-"))
    server = servers.start_prefect(home, servers.free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(home), "PREFECT_API_URL": server.url}
    env |= {"PREFECT_API_AUTH_STRING": os.environ["FEDTUNE_PREFECT_AUTH"]}
    env |= {"PREFECT_WORKER_QUERY_SECONDS": str(query_s), "PREFECT_WORKER_HEARTBEAT_SECONDS": str(parties.HEARTBEAT_S)}
    api = httpx.Client(
        base_url=server.url, headers=servers.basic_auth_header(os.environ["FEDTUNE_PREFECT_AUTH"]), timeout=120
    )
    started = []
    busy = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(load)]
    try:
        for pool in [f"party-{i}" for i in range(workers)] + ["nobody"]:
            api.post("/work_pools/", json={"name": pool, "type": "process"}).raise_for_status()
        for i in range(workers):
            command = [str(servers.BIN / "prefect"), "worker", "start", "--pool", f"party-{i}", "--type", "process"]
            started.append(servers.spawn(f"worker-{i}", command, env, home / f"worker-{i}.log"))
        flow = api.post("/flows/", json={"name": "probe"}).json()
        # on a pool no worker polls: the runs stay Scheduled and only the polls' writes compete
        probe = {"name": "probe", "flow_id": flow["id"], "work_pool_name": "nobody"}
        deployment = api.post("/deployments/", json=probe).json()
        time.sleep(20)  # every worker started and polling
        for process in busy:
            process.start()
        refused = 0
        for _ in range(submissions):
            response = api.post(f"/deployments/{deployment['id']}/create_flow_run", json={})
            if response.status_code not in (201, 503):
                response.raise_for_status()
            refused += response.status_code == 503
            time.sleep(0.5)
        return refused
    finally:
        for process in busy:
            process.kill()
        for worker in started:
            worker.terminate()
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--submissions", type=int, default=60)
    parser.add_argument("--workers", type=int, default=4, help="the coordinator's and three clients'")
    parser.add_argument("--load", type=int, default=5, help="busy processes while submitting")
    args = parser.parse_args()
    os.environ.setdefault("FEDTUNE_PREFECT_AUTH", f"admin:{secrets.token_urlsafe(24)}")
    rows = []
    for query_s in (BASELINE_QUERY_S, float(parties.QUERY_S)):
        refused = collisions(query_s, args.workers, args.load, args.submissions)
        rows.append({"query_s": query_s, "submissions": args.submissions, "refused_503": refused})
    base = rows[0]["refused_503"]
    print(f"{args.workers} workers, {args.load} busy processes, {args.submissions} submissions each, no retries")
    print(f"{'worker poll (s)':>15} {'503s':>6} {'rate':>7} {'vs 10 s':>8}")
    for row in rows:
        ratio = f"{row['refused_503'] / base:.1f}x" if base else "-"
        print(f"{row['query_s']:>15g} {row['refused_503']:>6} {row['refused_503'] / args.submissions:>7.1%} {ratio:>8}")
    save_results("prefect_submit_collisions", {"workers": args.workers, "load": args.load, "rows": rows})


if __name__ == "__main__":
    main()
