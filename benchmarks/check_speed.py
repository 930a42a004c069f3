"""How fast `fedtune check` reports a bad config, against the interpreter's own start-up.

    python benchmarks/check_speed.py [--repeat 5]

Runs each command `--repeat` times as a fresh process and prints the median wall time: a bare
`python -c pass` (the floor), `fedtune check` on a config with four problems (exit 2), on one
whose rules reach a strategy's options and limits, secure aggregation and record-level DP (Krum
with secure aggregation, record DP and heterogeneous ranks, five problems), and the
import of the modules that building a config used to pull in (strategies, PEFT methods,
partitioners, objectives: torch, peft, transformers, opacus, flwr-datasets) as the before.
Writes benchmarks/results/check_speed.json.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import save_results

ROOT = Path(__file__).resolve().parents[1]
BAD = ["-s", "federation.rounds=0", "-s", "federation.clients_per_round=9", "-s", "train.grad_accum=2"]
BAD += ["-s", "record_dp.enabled=true", "-s", "peft.method=lorax"]
STRATEGY_RULES = ["-s", "federation.strategy=krum", "-s", "federation.clients_per_round=3", "-s", "secagg.enabled=true"]
STRATEGY_RULES += ["-s", "record_dp.enabled=true", "-s", "train.grad_accum=2", "-s", "peft.client_ranks={0: 99}"]
STRATEGY_RULES += ["-s", "federation.min_fit_clients=4"]


def seconds(command: list[str], repeat: int, expect: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != expect:
            raise SystemExit(f"{command} exited {done.returncode}, expected {expect}: {done.stderr[-500:]}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description="fedtune check's wall time")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    python = sys.executable
    heavy = (
        "import fedtune.strategies.robust, fedtune.round.secure_round, fedtune.model.peft_methods, "
        "fedtune.data.partition, fedtune.training.objectives, fedtune.training.loop"
    )
    rows = {
        "python -c pass (interpreter start)": seconds([python, "-c", "pass"], args.repeat, 0),
        "fedtune check, config with 4 problems (exit 2)": seconds(
            [python, "-m", "flows.cli", "check", *BAD], args.repeat, 2
        ),
        "fedtune check, strategy, secure aggregation and record-DP rules (exit 2)": seconds(
            [python, "-m", "flows.cli", "check", *STRATEGY_RULES], args.repeat, 2
        ),
        "before: importing what building a config imported": seconds([python, "-c", heavy], args.repeat, 0),
    }
    save_results("check_speed", rows)
    print("| command | median wall time (s) | vs interpreter start |\n| --- | --- | --- |")
    floor = rows["python -c pass (interpreter start)"]
    for name, value in rows.items():
        print(f"| {name} | {value:.2f} | {value / floor:.1f}x |")


if __name__ == "__main__":
    main()
