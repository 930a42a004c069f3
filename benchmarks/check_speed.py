"""How fast `fedtune check` reports a bad config, against the interpreter's own start-up.

    python benchmarks/check_speed.py [--repeat 5]

Runs each command `--repeat` times as a fresh process and prints the median wall time: a bare
`python -c pass` (the floor), `fedtune check` on a config with four problems (exit 2), and the
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
        "import fedtune.strategies, fedtune.model.peft_methods, fedtune.data.partition, "
        "fedtune.training.objectives, fedtune.training.loop"
    )
    rows = {
        "python -c pass (interpreter start)": seconds([python, "-c", "pass"], args.repeat, 0),
        "fedtune check, config with 4 problems (exit 2)": seconds(
            [python, "-m", "flows.cli", "check", *BAD], args.repeat, 2
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
