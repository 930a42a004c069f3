"""Scale: federated rounds of 10 to 1,000 clients, client trainings in threads vs on Dask workers.

    python benchmarks/scale.py [--clients 10 20 50 1000] [--modes threads dask] [--parallel 2] [--steps 2]

Every (mode, clients) configuration runs two rounds of the real `federated-finetune` flow in a
fresh Python process, so the coordinator's peak RSS (VmHWM of the process that runs the flow:
aggregation, evaluation and, in `threads` mode, the trainings; Dask workers are processes of their
own) is that configuration's alone. The first round includes starting a local cluster; the second
is the steady state. The model is the test suite's tiny Llama, wider (2 layers, hidden 256), with
LoRA r=64 on every linear layer: a 2.1 MB update per client, about SmolLM2's in the demo, so an
aggregator that held every update would show in the memory column. The partitions (50, or as
many as the largest --clients, with at least 10 examples each) are the same for every
configuration; K of them are sampled.

Prints a markdown table with each mode's ratio to `threads` at the same number of clients; writes
benchmarks/results/scale.json. A mode is an entry of MODES: its config overrides and the function
that runs one configuration's flow; adding one (clients as Prefect deployments on work pools, say)
adds its rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import evaluation_seconds, prepared_config, save_results, scratch_overrides
from peak_memory import peak_mb

from fedtune.config.schema import FedConfig, load_config

MIN_PARTITIONS = 50
BASELINE = "threads"


def simulate(config: FedConfig) -> None:
    """The flow as the CLI runs it; `federation.runner` says where the clients train."""
    from flows.federated_finetune import federated_finetune

    federated_finetune(config=config, prepare_data=False)


MODES: dict[str, tuple[list[str], Callable[[FedConfig], None]]] = {
    "threads": (["federation.runner=threads"], simulate),
    "dask": (["federation.runner=dask"], simulate),  # a LocalCluster of federation.max_parallel_clients workers
    # a strategy that needs every update at once, for contrast with FedAvg's running sum
    "threads+median": (["federation.runner=threads", "federation.strategy=median"], simulate),
}


def build_model(directory: Path) -> Path:
    """The test suite's tiny-model builder (tests/conftest.py), at hidden size 256."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from transformers import AutoTokenizer

    from tests.conftest import build_model as build
    from tests.conftest import build_tokenizer

    build_tokenizer(directory)
    return build(directory, len(AutoTokenizer.from_pretrained(directory)), hidden=256)


def wide_model(root: Path) -> list[str]:
    """Overrides for the model `build_model` leaves in `root`/model, LoRA r=64 on every linear layer."""
    return [
        f"model.name_or_path={root}/model",
        "model.source=null",
        "model.dtype=float32",
        "peft.r=64",
        "peft.alpha=64",
        "peft.dropout=0.0",
        "peft.target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
        "data.max_length=48",
    ]


def overrides(root: Path, args: argparse.Namespace) -> list[str]:
    partitions = max(MIN_PARTITIONS, *args.clients)
    per_skill = max(200, 4 * partitions)  # 3 skills: 12 per partition (min_partition_size is 10) + the test set
    return [
        *scratch_overrides(root),
        *wide_model(root),
        f"data.synthetic={{examples_per_skill: {per_skill}, skills: [add, parity, successor]}}",
        f"data.partition={{scheme: iid, num_clients: {partitions}, test_fraction: 0.1}}",
        "federation.rounds=2",
        f"federation.max_parallel_clients={args.parallel}",
        f"train.steps_per_round={args.steps}",
        "train.batch_size=4",
        "eval.generation_samples=0",
    ]


def measure(mode: str, clients: int, root: Path, args: argparse.Namespace) -> dict[str, float]:
    """Run in the fresh process: the configuration's rounds, then this process's peak and CPU."""
    import tasks.training

    extra, run = MODES[mode]
    out = root / f"{mode}-{clients}"
    coordinator, here, train = os.getpid(), [], tasks.training.train_client

    def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        """Counts the trainings that run in this process (it travels to workers with the task)."""
        if os.getpid() == coordinator:
            here.append(1)
        return train(*args, **kwargs)

    tasks.training.train_client = counted
    config = load_config(
        "params.yaml",
        [*overrides(root, args), *extra, f"federation.clients_per_round={clients}", f"federation.output_dir={out}"],
    )
    run(config)
    _, rows = evaluation_seconds(out)
    return {
        "round_1_seconds": float(rows[1]["round_seconds"]),
        "round_2_seconds": float(rows[2]["round_seconds"]),
        "coordinator_peak_rss_mb": peak_mb(),  # this process's own, not the driver's that started it
        "trainings_in_coordinator": len(here),
        "trainings": sum(int(row["clients_aggregated"]) for row in rows[1:]),
        "update_bytes": float(rows[2]["bytes_up_per_client"]),
    }


def in_fresh_process(mode: str, clients: int, root: Path, argv: list[str]) -> dict[str, float]:
    command = [sys.executable, __file__, *argv, "--measure", mode, str(clients), str(root)]
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} with {clients} clients failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, float | str]]) -> str:
    lines = [
        "| clients | mode | round 1 s (incl. cluster start) | round 2 s | vs threads | coordinator peak RSS MB "
        "| vs threads | trainings in the coordinator |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['clients']} | {row['mode']} | {row['round_1_seconds']:.1f} | {row['round_2_seconds']:.1f} "
            f"| {row['round_ratio']:.2f} | {row['coordinator_peak_rss_mb']:.0f} | {row['rss_ratio']:.2f} "
            f"| {row['trainings_in_coordinator']:.0f} of {row['trainings']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="round time and coordinator memory vs number of clients")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=[BASELINE, "dask"])
    parser.add_argument("--parallel", type=int, default=2, help="federation.max_parallel_clients (Dask workers)")
    parser.add_argument("--steps", type=int, default=2, help="train.steps_per_round")
    parser.add_argument("--measure", nargs=3, metavar=("MODE", "CLIENTS", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        mode, clients, root = args.measure
        print(json.dumps(measure(mode, int(clients), Path(root), args)))
        return

    modes = [BASELINE, *(m for m in args.modes if m != BASELINE)]
    passthrough = ["--parallel", str(args.parallel), "--steps", str(args.steps), "--clients", *map(str, args.clients)]
    rows: list[dict[str, float | str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_model(root / "model")
        prepared_config(root, overrides(root, args))  # the partitions every configuration shares
        for clients in args.clients:
            baseline: dict[str, float] = {}
            for mode in modes:
                start = time.perf_counter()
                result = in_fresh_process(mode, clients, root, passthrough)
                baseline = baseline or result
                rows.append(
                    {
                        "clients": clients,
                        "mode": mode,
                        **result,
                        "round_ratio": result["round_2_seconds"] / baseline["round_2_seconds"],
                        "rss_ratio": result["coordinator_peak_rss_mb"] / baseline["coordinator_peak_rss_mb"],
                        "process_seconds": time.perf_counter() - start,
                    }
                )
                print(f"{mode}, {clients} clients: {rows[-1]}", file=sys.stderr)
    save_results("scale", {"parallel": args.parallel, "steps": args.steps, "rows": rows})
    print(table(rows))


if __name__ == "__main__":
    main()
