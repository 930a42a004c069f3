"""Heterogeneous LoRA ranks: HetLoRA zero padding against FlexLoRA's SVD, on real data.

    python benchmarks/hetero_ranks.py [--rounds 3] [--steps 3] [--ranks 2 4]

AG News as in benchmarks/matrix.py (400 class-balanced rows, 16% held out, 3 clients under
Dirichlet(1.0), SmolLM2-135M-Instruct, LoRA on q_proj and v_proj at global rank 8). Clients 0 and
1 train the ranks given by --ranks, client 2 the full rank 8. Rows: every client at rank 8 and
every client at the lowest rank (the two homogeneous bounds), then HetLoRA and FlexLoRA with the
mixed ranks, and FlexLoRA with every client at rank 8 (mean of products instead of products of
means). Prints a markdown table and writes benchmarks/results/hetero_ranks.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from common import RESULTS, prepared_config, save_results
from matrix import PARTITIONS, PEFT, accuracy_by_round, datasets_for


def designs(ranks: list[int]) -> list[tuple[str, str, list[str]]]:
    """(aggregation, client ranks, overrides) of each row."""
    mixed = "{" + ", ".join(f"{c}: {r}" for c, r in enumerate(ranks)) + "}"
    lowest, listed = min(ranks), f"{', '.join(map(str, ranks))}, 8"
    return [
        ("fedavg", "8, 8, 8", []),
        ("fedavg", f"{lowest}, {lowest}, {lowest}", [f"peft.r={lowest}", f"peft.alpha={2 * lowest}"]),
        ("HetLoRA (fedavg, zero padding)", listed, [f"peft.client_ranks={mixed}"]),
        ("FlexLoRA (SVD)", listed, [f"peft.client_ranks={mixed}", "federation.strategy=flexlora"]),
        ("FlexLoRA (SVD)", "8, 8, 8", ["federation.strategy=flexlora"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="HetLoRA vs FlexLoRA with clients of different LoRA ranks")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="train.steps_per_round")
    parser.add_argument("--ranks", type=int, nargs=2, default=[2, 4], help="clients 0 and 1 (client 2 has r=8)")
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark_hetero_ranks"))
    args = parser.parse_args()
    if not all(0 < r <= 8 for r in args.ranks):
        parser.error(f"--ranks {args.ranks}: each must be in 1..8 (the global rank)")
    from flows.federated_finetune import federated_finetune

    args.out.mkdir(parents=True, exist_ok=True)
    selection = argparse.Namespace(
        datasets=["ag_news"], partitions=["dir1.0"], strategies=["fedavg"], examples=args.examples, seed=args.seed
    )
    (ag_news,) = datasets_for(selection, args.out)
    common = [
        *ag_news.overrides,
        *PARTITIONS["dir1.0"],
        *PEFT["lora"],
        "data.partition.num_clients=3",
        "data.partition.min_partition_size=10",
        "data.partition.val_fraction=0.05",
        "data.partition.test_fraction=0.16",
        f"federation.rounds={args.rounds}",
        "federation.clients_per_round=3",
        f"train.steps_per_round={args.steps}",
        "tracking.experiment=hetero-ranks",
    ]
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for index, (aggregation, ranks, overrides) in enumerate(designs(args.ranks)):
        out = args.out / f"run-{index}"
        config = prepared_config(args.out, [*common, *overrides, f"federation.output_dir={out}"])
        tick = time.perf_counter()
        summary = federated_finetune(config=config, prepare_data=False)
        rows.append(
            {
                "aggregation": aggregation,
                "client_ranks": ranks,
                "accuracy": summary["test_accuracy"],
                "accuracy_by_round": accuracy_by_round(out),
                "test_loss": summary["test_loss"],
                "bytes_up_per_client_round": summary["bytes_up_per_client_round"],
                "seconds": time.perf_counter() - tick,
                "mlflow_run_id": summary["mlflow_run_id"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    minutes = (time.perf_counter() - started) / 60
    lines = [
        f"AG News, {args.examples} rows (16% test), 3 clients Dirichlet(1.0), {args.rounds} rounds x {args.steps} "
        f"steps, SmolLM2-135M-Instruct, LoRA q_proj/v_proj at global rank 8; {minutes:.0f} min in all",
        "",
        "| aggregation | client ranks | accuracy | test loss | upload/client/round |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['aggregation']} | {r['client_ranks']} | {r['accuracy']:.3f} | {r['test_loss']:.4f} "
        f"| {r['bytes_up_per_client_round']:,.0f} B |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    save_results("hetero_ranks", {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    (RESULTS / "hetero_ranks.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
