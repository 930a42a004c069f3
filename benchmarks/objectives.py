"""Federated DPO and continued pre-training on SmolLM2-135M-Instruct: before vs after, vs local-only.

    python benchmarks/objectives.py [--rounds 3] [--steps 8]

- DPO: preference pairs from the generated skills (the chosen response is the right answer, the
  rejected one a near miss: an off-by-one number, the wrong parity, a reversed list), 3 clients
  with Dirichlet(0.3) skill skew. Held-out DPO loss, reward accuracy and margin, and exact match of
  greedy answers, at round 0 (the base model) and after the last round.
- Continued pre-training: AG News titles and descriptions as raw text (../shared/data), 3 clients
  with Dirichlet(0.3) topic skew; held-out next-token loss and perplexity.

Each also runs the local-only baseline (every client alone, same steps). Prints a markdown table;
writes benchmarks/results/objectives.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path
from typing import Any

from common import prepared_config, save_results

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_news_text(path: Path, rows: int) -> None:
    with (SHARED / "ag_news" / "ag_news_7600.csv").open() as handle:
        reader = list(csv.reader(handle))[:rows]
    path.write_text(
        "".join(json.dumps({"text": f"{t}. {d}".replace("\\", " "), "topic": c}) + "\n" for c, t, d in reader)
    )


def first_and_last(output_dir: str) -> tuple[dict[str, float], dict[str, float]]:
    with (Path(output_dir) / "rounds.csv").open() as handle:
        rows = [{k: float(v) for k, v in r.items() if v and k.startswith("test_")} for r in csv.DictReader(handle)]
    return rows[0], rows[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description="federated DPO and continued pre-training")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--news-rows", type=int, default=900)
    args = parser.parse_args()
    from flows.federated_finetune import federated_finetune
    from flows.local_only import local_only

    common = [
        f"federation.rounds={args.rounds}",
        f"train.steps_per_round={args.steps}",
        "data.partition.alpha=0.3",
        "data.partition.num_clients=3",
    ]
    settings = {
        "dpo": [
            "train.objective=dpo",
            "train.lr=0.0005",
            "data.columns.rejected=rejected",
            "data.synthetic.examples_per_skill=150",
            "eval.generation_samples=96",
        ],
        "pretrain": [
            "train.objective=pretrain",
            "data.columns={text: text, label: topic}",
            "data.max_length=96",
        ],
    }
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = root / "news.jsonl"
        write_news_text(corpus, args.news_rows)
        settings["pretrain"].append(f"data.source={corpus}")
        for name, extra in settings.items():
            config = prepared_config(root / name, [*common, *extra])
            summary = federated_finetune(config=config, prepare_data=False)
            before, after = first_and_last(config.federation.output_dir)
            alone = local_only(config=config, prepare_data=False, output_dir=str(root / name / "local"))
            results[name] = {
                "before": before,
                "federated": after,
                "local_only": {k: v for k, v in alone.items() if k.startswith("test_") and isinstance(v, float)},
                "bytes_up_per_client_round": summary["bytes_up_per_client_round"],
            }
    save_results("objectives", {"args": vars(args), "results": results})
    print(f"3 clients, Dirichlet(0.3) skew, {args.rounds} rounds x {args.steps} steps, SmolLM2-135M-Instruct, LoRA r=8")
    print("| objective | metric | round 0 (base) | federated | local-only (mean of clients) |")
    print("| --- | --- | --- | --- | --- |")
    metrics = {
        "dpo": ["test_dpo_loss", "test_reward_accuracy", "test_reward_margin", "test_accuracy", "test_loss"],
        "pretrain": ["test_loss", "test_perplexity"],
    }
    for name, keys in metrics.items():
        r = results[name]
        for key in keys:
            local = r["local_only"].get(key)
            local_text = "–" if local is None else f"{local:.4f}"
            print(f"| {name} | {key} | {r['before'][key]:.4f} | {r['federated'][key]:.4f} | {local_text} |")


if __name__ == "__main__":
    main()
