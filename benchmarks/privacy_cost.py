"""Cost of DP and secure aggregation on a full federated round, relative to plain FedAvg.

Each variant runs the real `federated-finetune` flow for one round with the default model and
data (3 clients, same seeds), one after the other in one process; evaluation time is reported
by the flow and taken out, so the ratio compares training + aggregation + orchestration.

    python benchmarks/privacy_cost.py [--steps 10] [-s key=value ...]

Prints a markdown table; writes benchmarks/results/privacy_cost.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import evaluation_seconds, prepared_config, save_results, scratch_overrides

from fedtune.config.schema import load_config

VARIANTS = {
    "fedavg": [],
    "dp_fedavg": [
        "federation.strategy=dp_fedavg",
        "federation.strategy_options={clip_norm: 0.5, noise_multiplier: 1.0}",
    ],
    "secure aggregation": ["secagg.enabled=true"],
    "dp_fedavg + secure aggregation (client noise)": [
        "federation.strategy=dp_fedavg",
        "federation.strategy_options={clip_norm: 0.5, noise_multiplier: 1.0}",
        "secagg.enabled=true",
    ],
    "record-level DP-SGD (Opacus)": ["record_dp.enabled=true", "record_dp.noise_multiplier=1.0"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description="privacy cost on a federated round")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("-s", "--set", action="append", default=[], help="config override dotted.key=value")
    args = parser.parse_args()

    from flows.federated_finetune import federated_finetune

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = ["federation.rounds=1", f"train.steps_per_round={args.steps}", "eval.generation_samples=0", *args.set]
        config = prepared_config(root, base)
        federated_finetune(config=config, prepare_data=False)  # warm-up: server start, caches
        for name, overrides in VARIANTS.items():
            variant = load_config(
                "params.yaml", [*scratch_overrides(root), *base, *overrides, f"federation.output_dir={root}/{name}"]
            )
            start = time.perf_counter()
            summary = federated_finetune(config=variant, prepare_data=False)
            wall = time.perf_counter() - start
            evaluation, history = evaluation_seconds(variant.federation.output_dir)
            round_one = next(r for r in history if r["round"] == "1")
            rows.append(
                {
                    "variant": name,
                    "seconds": wall - evaluation,
                    "round_seconds": float(round_one["round_seconds"]) - float(round_one["eval_seconds"]),
                    "bytes_up_per_client": summary["bytes_up_per_client_round"],
                    "test_loss": summary["test_loss"],
                }
            )
    baseline = rows[0]
    save_results("privacy_cost", rows)
    print("| variant | round s (no eval) | x fedavg | flow s (no eval) | x fedavg | bytes up / client | test loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['variant']} | {r['round_seconds']:.1f} | {r['round_seconds'] / baseline['round_seconds']:.3f} "
            f"| {r['seconds']:.1f} | {r['seconds'] / baseline['seconds']:.3f} | {r['bytes_up_per_client']:,.0f} "
            f"| {r['test_loss']:.4f} |"
        )


if __name__ == "__main__":
    main()
