"""Update compression: bytes on the wire against what it costs the model, in the same federation.

    python benchmarks/compression.py [--rounds 4] [--steps 8]

Runs the same federated rounds (3 clients, the tiny Llama at hidden 256 with LoRA r=64 on every
linear layer, the generated skills data) once per compression setting, in this process, and
prints a markdown table: mean upload per client per round (the update files' bytes), its ratio to
uncompressed, and the final test loss and its difference to uncompressed. Writes
benchmarks/results/compression.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import evaluation_seconds, prepared_config, save_results
from scale import build_model, wide_model

SETTINGS = [
    ("none", []),
    ("int8", ["compression.method=int8"]),
    ("int4", ["compression.method=int4"]),
    ("top-10%", ["compression.method=topk", "compression.topk_fraction=0.1"]),
    ("top-1%", ["compression.method=topk", "compression.topk_fraction=0.01"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description="update compression: bytes vs test loss")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="train.steps_per_round")
    args = parser.parse_args()
    from flows.federated_finetune import federated_finetune

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_model(root / "model")
        base = [
            *wide_model(root),
            "data.synthetic={examples_per_skill: 80, skills: [add, parity, successor]}",
            "data.partition={scheme: dirichlet, alpha: 1.0, num_clients: 3, test_fraction: 0.1}",
            f"federation.rounds={args.rounds}",
            "federation.clients_per_round=3",
            f"train.steps_per_round={args.steps}",
            "train.batch_size=4",
            "train.lr=0.003",
            "eval.generation_samples=0",
        ]
        for name, extra in SETTINGS:
            config = prepared_config(root, [*base, *extra, f"federation.output_dir={root}/{name}"])
            summary = federated_finetune(config=config, prepare_data=False)
            _, rounds = evaluation_seconds(config.federation.output_dir)
            upload = statistics.mean(float(r["bytes_up_per_client"]) for r in rounds[1:])
            rows.append({"setting": name, "bytes_up_per_client": upload, "test_loss": summary["test_loss"]})
    plain = rows[0]
    for row in rows:
        row["bytes_ratio"] = row["bytes_up_per_client"] / plain["bytes_up_per_client"]
        row["loss_change"] = row["test_loss"] - plain["test_loss"]
    save_results("compression", {"args": vars(args), "rows": rows})
    print(f"3 clients, {args.rounds} rounds of {args.steps} steps; round 0 test loss is the same for all")
    print("| compression | upload per client per round (bytes) | vs none | final test loss | vs none |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['setting']} | {row['bytes_up_per_client']:,.0f} | {row['bytes_ratio']:.3f} "
            f"| {row['test_loss']:.4f} | {row['loss_change']:+.4f} |"
        )


if __name__ == "__main__":
    main()
