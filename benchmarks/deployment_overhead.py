"""Deployment mode vs simulation: the same federated rounds, clients as threads or as Prefect deployments.

    sudo python benchmarks/deployment_overhead.py [--clients 3] [--rounds 2] [--steps 4] [--secagg]

Simulation runs the `federated-finetune` flow in this process (clients train in its threads).
Deployment brings up the whole one-machine recipe (`deploy/federation.py`: Prefect and MLflow
servers with auth, a confined worker per party, `prefect deploy --all`), runs the coordinator
deployment, and every sampled client trains in a flow run of its own organization's worker: a
fresh process that loads the model, while the coordinator polls the exchange. Same model, data,
seeds and steps; the model is scale.py's tiny Llama at hidden 256 with LoRA r=64 (2.1 MB updates).

Prints a markdown table: round time without evaluation (evaluation is the same work in both
modes), the deployment/simulation ratio, and the overhead per client per round; writes
benchmarks/results/deployment_overhead.json. Needs root (the workers' mount namespaces).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import evaluation_seconds, save_results, scratch_overrides
from scale import build_model, wide_model

from deploy.federation import distribute_from
from fedtune.config.schema import FedConfig, load_config

SECRETS = {
    "FEDTUNE_PREFECT_AUTH": "bench:overhead-prefect-s3cret",
    "MLFLOW_TRACKING_USERNAME": "bench",
    "MLFLOW_TRACKING_PASSWORD": "overhead-mlflow-s3cret",
}


def config(root: Path, args: argparse.Namespace) -> FedConfig:
    return load_config(
        "params.yaml",
        [
            *scratch_overrides(root),
            f"data.processed_path={root}/source/data.jsonl",  # the undistributed data: hidden from every worker
            f"data.partitions_dir={root}/source/partitions",
            *wide_model(root),
            "data.synthetic={examples_per_skill: 60, skills: [add, parity, successor]}",
            f"data.partition={{scheme: iid, num_clients: {args.clients}, test_fraction: 0.1}}",
            f"federation.rounds={args.rounds}",
            f"federation.clients_per_round={args.clients}",
            f"train.steps_per_round={args.steps}",
            "train.batch_size=4",
            "eval.generation_samples=0",
            f"secagg.enabled={str(args.secagg).lower()}",
        ],
    )


def round_seconds(output_dir: str | Path) -> list[float]:
    """Each round's seconds without its evaluation."""
    _, rows = evaluation_seconds(output_dir)
    return [float(r["round_seconds"]) - float(r["eval_seconds"]) for r in rows[1:]]


def simulate(cfg: FedConfig) -> list[float]:
    from flows.federated_finetune import federated_finetune

    federated_finetune(config=cfg, prepare_data=False)
    return round_seconds(cfg.federation.output_dir)


def deploy(cfg: FedConfig, root: Path, source: list[Path]) -> list[float]:
    from prefect.deployments import run_deployment

    from deploy.federation import running

    os.environ.update(SECRETS)
    with running(cfg, root / "deployment", Path(cfg.model.name_or_path), source) as federation:
        flow_run: Any = run_deployment(
            "federated-finetune/coordinator",
            parameters={"config": federation.config.model_dump(mode="json"), "prepare_data": False},
            timeout=3600,
        )
        if not flow_run.state.is_completed():
            raise RuntimeError(f"the deployed run ended {flow_run.state}; logs in {federation.layout.root / 'logs'}")
        return round_seconds(federation.config.federation.output_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description="deployment mode vs simulation, same rounds")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="train.steps_per_round")
    parser.add_argument("--secagg", action="store_true", help="with secure aggregation in both modes")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: round 1 includes one-off start-up costs")
    if os.geteuid() != 0:
        sys.exit("needs root: the one-machine recipe confines each worker in a mount namespace")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_model(root / "model")
        cfg = config(root, args)
        source = distribute_from(cfg)
        start = time.perf_counter()
        simulated = simulate(cfg)
        simulation_wall = time.perf_counter() - start
        start = time.perf_counter()
        deployed = deploy(cfg, root, source)
        deployment_wall = time.perf_counter() - start
    rows = [
        {"mode": "simulation (threads)", "rounds": simulated, "wall": simulation_wall},
        {"mode": "deployment (a worker per party)", "rounds": deployed, "wall": deployment_wall},
    ]
    save_results("deployment_overhead", {"args": vars(args), "rows": rows})
    base = sum(simulated[1:]) / len(simulated[1:])
    secagg = "on" if args.secagg else "off"
    print(f"{args.clients} clients, {args.steps} steps each per round, secure aggregation {secagg}")
    print("| mode | round 1 s | later rounds s (mean) | vs simulation | overhead per client per round s |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        later = sum(row["rounds"][1:]) / len(row["rounds"][1:])
        print(
            f"| {row['mode']} | {row['rounds'][0]:.1f} | {later:.1f} | {later / base:.2f} "
            f"| {(later - base) / args.clients:.1f} |"
        )


if __name__ == "__main__":
    main()
