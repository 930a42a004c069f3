"""The algorithm and PEFT matrix on real data, with local-only and centralized rows.

    python benchmarks/matrix.py                       # AG News, the default design: < 1 h on 2 CPU cores
    python benchmarks/matrix.py --datasets gsm8k      # Fed-GSM8K-3: FedAvg, FedProx, FedAdam + baselines
    python benchmarks/matrix.py --strategies fedyogi fedadam --partitions dir1.0 --peft --eta 1e-3 1e-2  # eta sweep
    python benchmarks/matrix.py --datasets ag_news gsm8k --full --examples 4000 --rounds 10 --steps 30  # GPU

Data (from ../shared/data, converted to the project's JSONL layout and loaded by the normal data
loader): AG News as topic classification by generation (the response is the class name, accuracy
is exact match), split over 3 clients (IID, or label-skewed by Dirichlet over the class); and a
Fed-GSM8K-3 style split (3 IID clients of GSM8K's train set; eval loss and final-answer exact
match via `eval.answer_pattern`). The model is SmolLM2-135M-Instruct, the project default.

The default design is what fits an hour on 2 CPU cores, and it subsamples (the table says how):
AG News runs every strategy x every partition with LoRA, every other PEFT method with FedAvg on
Dirichlet 1.0, local-only per partition and centralized once; GSM8K runs FedAvg, FedProx
and FedAdam with LoRA plus both baselines. `--full` runs the whole cross product.
Every run is a normal flow run, logged to the MLflow store under `--out`.

Prints a markdown table and writes it (and JSON) under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import RESULTS, prepared_config, save_results

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
AG_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
AG_INSTRUCTION = "Which topic is this news article about: World, Sports, Business or Sci/Tech?\n\n"
GSM8K_ANSWER = r"####\s*([-\d.,]+)"

# Server optimizers at OpenFedLLM's server learning rate; FedProx at its mu; SCAFFOLD plain.
STRATEGIES: dict[str, dict[str, float]] = {
    "fedavg": {},
    "fedprox": {"mu": 0.01},
    "scaffold": {},
    "fedavgm": {"server_lr": 1.0, "momentum": 0.9},
    "fedadagrad": {"eta": 1e-2},
    "fedyogi": {"eta": 1e-2},
    "fedadam": {"eta": 1e-2},
}
GSM8K_STRATEGIES = ("fedavg", "fedprox", "fedadam")  # the default design's subsample (long sequences)
PARTITIONS = {
    "iid": ["data.partition.scheme=iid"],
    "dir1.0": ["data.partition.scheme=dirichlet", "data.partition.alpha=1.0"],
    "dir0.1": ["data.partition.scheme=dirichlet", "data.partition.alpha=0.1"],
}
PEFT = {
    "lora": ["peft.method=lora", "peft.target_modules=[q_proj, v_proj]"],
    "ia3": [
        "peft.method=ia3",
        "peft.target_modules=[k_proj, v_proj, down_proj]",
        "peft.feedforward_modules=[down_proj]",
    ],
    "prompt_tuning": ["peft.method=prompt_tuning", "peft.num_virtual_tokens=16", "train.lr=0.03"],
    "p_tuning": ["peft.method=p_tuning", "peft.num_virtual_tokens=16"],
    "prefix_tuning": ["peft.method=prefix_tuning", "peft.num_virtual_tokens=16", "train.lr=0.01"],
}


@dataclass
class Dataset:
    name: str
    clients: int
    partitions: list[str]
    strategies: list[str]
    overrides: list[str] = field(default_factory=list)


def write_ag_news(path: Path, examples: int, seed: int, shared: Path = SHARED) -> None:
    """A class-balanced sample of AG News as instruction/response/label rows."""
    with (shared / "ag_news" / "ag_news_7600.csv").open() as handle:
        rows = list(csv.reader(handle))
    random.Random(seed).shuffle(rows)
    per_class = examples // len(AG_CLASSES)
    kept: dict[str, list[dict[str, str]]] = {c: [] for c in AG_CLASSES}
    for label, title, description in rows:
        topic = AG_CLASSES[int(label) - 1]
        if len(kept[topic]) < per_class:
            text = f"{title}. {description}".replace("\\", " ")
            kept[topic].append({"instruction": AG_INSTRUCTION + text, "response": topic, "label": topic})
    mixed = [row for group in zip(*kept.values(), strict=True) for row in group]
    path.write_text("".join(json.dumps(row) + "\n" for row in mixed))


def write_gsm8k(path: Path, examples: int, seed: int, shared: Path = SHARED) -> None:
    """A random sample of GSM8K's train split (the held-out test comes from it, like every source)."""
    lines = (shared / "gsm8k" / "train.jsonl").read_text().splitlines()
    random.Random(seed).shuffle(lines)
    path.write_text("\n".join(lines[:examples]) + "\n")


def datasets_for(args: argparse.Namespace, root: Path) -> list[Dataset]:
    chosen = []
    if "ag_news" in args.datasets:
        source = root / "ag_news.jsonl"
        write_ag_news(source, args.examples, args.seed, args.shared)
        chosen.append(
            Dataset(
                "ag_news",
                3,
                args.partitions,
                args.strategies,
                [
                    f"data.source={source}",
                    "data.columns={instruction: instruction, input: null, response: response, label: label}",
                    "data.system_prompt=Answer with the topic only.",
                    "data.max_length=128",
                    "eval.max_new_tokens=5",
                    f"eval.generation_samples={args.examples}",  # the whole test split
                ],
            )
        )
    if "gsm8k" in args.datasets:
        source = root / "gsm8k.jsonl"
        write_gsm8k(source, args.gsm8k_examples, args.seed, args.shared)
        chosen.append(
            Dataset(
                "gsm8k",
                3,
                ["iid"],
                args.strategies if args.full else [s for s in GSM8K_STRATEGIES if s in args.strategies],
                [
                    f"data.source={source}",
                    "data.columns={instruction: question, input: null, response: answer, label: null}",
                    "data.system_prompt='Solve the problem step by step, then give the final number after ####.'",
                    "data.max_length=256",
                    "train.batch_size=4",
                    f"eval.answer_pattern='{GSM8K_ANSWER}'",
                    "eval.max_new_tokens=160",
                    f"eval.generation_samples={args.gsm8k_generation_samples}",
                ],
            )
        )
    return chosen


def variants(strategy: str, etas: list[float]) -> list[str]:
    """The strategy's row labels: a server optimizer once per --eta value, anything else once."""
    if not etas or "eta" not in STRATEGIES[strategy]:
        return [strategy]
    return [f"{strategy} eta={eta:g}" for eta in etas]


def strategy_of(label: str) -> tuple[str, dict[str, float]]:
    """(strategy, options) of a row label made by `variants`."""
    name, _, eta = label.partition(" eta=")
    return name, STRATEGIES[name] | ({"eta": float(eta)} if eta else {})


def cells(dataset: Dataset, args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(partition, strategy row label, peft) of every federated run in the design."""
    labels = [label for strategy in dataset.strategies for label in variants(strategy, args.eta)]
    runs = [(p, s, "lora") for p, s in itertools.product(dataset.partitions, labels)]
    if args.full:
        runs += [(p, s, m) for p, s, m in itertools.product(dataset.partitions, labels, args.peft)]
    elif dataset.name == "ag_news":
        partition = "dir1.0" if "dir1.0" in dataset.partitions else dataset.partitions[0]
        runs += [(partition, "fedavg", m) for m in args.peft]
    return list(dict.fromkeys(runs))


def accuracy_by_round(output_dir: Path) -> list[float]:
    with (output_dir / "rounds.csv").open() as handle:
        return [float(row.get("test_accuracy") or "nan") for row in csv.DictReader(handle)]


def run_dataset(dataset: Dataset, args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    from flows.centralized import centralized
    from flows.federated_finetune import federated_finetune
    from flows.local_only import local_only

    common = [
        *dataset.overrides,
        f"data.partition.num_clients={dataset.clients}",
        "data.partition.min_partition_size=10",
        "data.partition.val_fraction=0.05",
        f"data.partition.test_fraction={args.test_fraction}",
        f"federation.rounds={args.rounds}",
        f"federation.clients_per_round={dataset.clients}",
        f"train.steps_per_round={args.steps}",
        f"tracking.tracking_uri=sqlite:///{args.out.resolve()}/mlflow.db",
        f"tracking.artifact_location={args.out.resolve()}/mlartifacts",
        f"tracking.experiment=matrix-{dataset.name}",
    ]
    rows: list[dict[str, Any]] = []
    for partition in dataset.partitions:
        part = [*common, *PARTITIONS[partition]]
        for _, label, peft in [c for c in cells(dataset, args) if c[0] == partition]:
            strategy, options = strategy_of(label)
            out = root / dataset.name / f"{partition}-{label.replace(' eta=', '-eta')}-{peft}"
            config = prepared_config(
                root / dataset.name,
                [
                    *part,
                    *PEFT[peft],
                    f"federation.strategy={strategy}",
                    f"federation.strategy_options={json.dumps(options)}",
                    f"federation.output_dir={out}",
                ],
            )
            tick = time.perf_counter()
            summary = federated_finetune(config=config, prepare_data=False)
            rows.append(
                {
                    "dataset": dataset.name,
                    "partition": partition,
                    "method": label,
                    "peft": peft,
                    "accuracy": summary["test_accuracy"],
                    "accuracy_by_round": accuracy_by_round(out),
                    "test_loss": summary["test_loss"],
                    "bytes_up_per_client_round": summary["bytes_up_per_client_round"],
                    "share_of_full_finetuning": summary["share_of_full_finetuning"],
                    "seconds": time.perf_counter() - tick,
                    "mlflow_run_id": summary["mlflow_run_id"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        config = prepared_config(root / dataset.name, [*part, *PEFT["lora"]])
        tick = time.perf_counter()
        alone = local_only(
            config=config, prepare_data=False, output_dir=str(root / dataset.name / f"{partition}-local")
        )
        rows.append(baseline_row(dataset, partition, "local-only", alone, tick))
        print(json.dumps(rows[-1]), flush=True)
    config = prepared_config(root / dataset.name, [*common, *PEFT["lora"], *PARTITIONS["iid"]])
    tick = time.perf_counter()
    pooled = centralized(config=config, prepare_data=False, output_dir=str(root / dataset.name / "centralized"))
    rows.append(baseline_row(dataset, "pooled", "centralized", pooled, tick))
    print(json.dumps(rows[-1]), flush=True)
    return rows


def baseline_row(dataset: Dataset, partition: str, method: str, summary: dict[str, Any], tick: float) -> dict[str, Any]:
    return {
        "dataset": dataset.name,
        "partition": partition,
        "method": method,
        "peft": "lora",
        "accuracy": summary.get("test_accuracy"),
        "accuracy_by_round": [],
        "test_loss": summary["test_loss"],
        "bytes_up_per_client_round": 0,
        "share_of_full_finetuning": 0.0,
        "seconds": time.perf_counter() - tick,
        "mlflow_run_id": summary["mlflow_run_id"],
    }


def judge(rows: list[dict[str, Any]], target_share: float) -> None:
    """Rounds to reach `target_share` of the centralized accuracy; beats local-only or not."""
    for name in {r["dataset"] for r in rows}:
        mine = [r for r in rows if r["dataset"] == name]
        central = next(r for r in mine if r["method"] == "centralized")
        target = target_share * (central["accuracy"] or 0.0)
        for row in mine:
            row["target_accuracy"] = target
            reached = [i for i, acc in enumerate(row["accuracy_by_round"]) if acc >= target]
            row["rounds_to_target"] = reached[0] if reached and target > 0 else None  # no target without accuracy
            local = next((r for r in mine if r["method"] == "local-only" and r["partition"] == row["partition"]), None)
            federated = row["method"] not in ("local-only", "centralized")
            row["beats_local_accuracy"] = federated and local is not None and row["accuracy"] > local["accuracy"]
            row["beats_local_loss"] = federated and local is not None and row["test_loss"] < local["test_loss"]


def _cell(value: Any, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "| data | partition | method | PEFT | accuracy | test loss | rounds to target | upload/client/round "
        "| % of full FT | beats local-only (acc / loss) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        federated = r["method"] not in ("local-only", "centralized")
        beats = f"{'yes' if r['beats_local_accuracy'] else 'no'} / {'yes' if r['beats_local_loss'] else 'no'}"
        lines.append(
            f"| {r['dataset']} | {r['partition']} | {r['method']} | {r['peft']} | {_cell(r['accuracy'], '.3f')} "
            f"| {r['test_loss']:.4f} | {_cell(r['rounds_to_target'], 'd') if federated else '–'} "
            f"| {r['bytes_up_per_client_round']:,.0f} B | {100 * r['share_of_full_finetuning']:.3f}% "
            f"| {beats if federated else '–'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="strategies x partitions x PEFT on AG News and GSM8K")
    parser.add_argument("--datasets", nargs="+", default=["ag_news"], choices=["ag_news", "gsm8k"])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=list(PARTITIONS))
    parser.add_argument("--peft", nargs="*", default=[m for m in PEFT if m != "lora"], choices=list(PEFT))
    parser.add_argument(
        "--eta", type=float, nargs="+", default=[], help="server learning rates: one row per value per server optimizer"
    )
    parser.add_argument("--full", action="store_true", help="every strategy x partition x PEFT method")
    parser.add_argument("--examples", type=int, default=400, help="AG News rows sampled (class-balanced)")
    parser.add_argument("--gsm8k-examples", type=int, default=240, help="GSM8K train rows sampled")
    parser.add_argument("--test-fraction", type=float, default=0.16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="train.steps_per_round")
    parser.add_argument("--gsm8k-generation-samples", type=int, default=16)
    parser.add_argument("--target", type=float, default=0.9, help="share of centralized accuracy to reach")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark_matrix"))
    parser.add_argument("--shared", type=Path, default=SHARED, help="the folder holding ag_news/ and gsm8k/")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for dataset in datasets_for(args, args.out):
        rows += run_dataset(dataset, args, args.out)
    judge(rows, args.target)
    minutes = (time.perf_counter() - started) / 60
    header = (
        f"{args.examples if 'ag_news' in args.datasets else 0} AG News and "
        f"{args.gsm8k_examples if 'gsm8k' in args.datasets else 0} GSM8K rows sampled "
        f"({args.test_fraction:.0%} held out as test), "
        f"{args.rounds} rounds x {args.steps} steps per client, SmolLM2-135M-Instruct, {minutes:.0f} min in all; "
        f"rounds to target: first round (0 = before training) reaching {args.target:.0%} of centralized accuracy"
    )
    text = f"{header}\n\n{table(rows, args)}\n"
    save_results("matrix", {"args": {k: str(v) for k, v in vars(args).items()}, "minutes": minutes, "rows": rows})
    (RESULTS / "matrix.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
