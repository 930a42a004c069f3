"""Framework overhead: one federated round with one client vs the same steps in a plain peft loop.

Both sides use the same model, data, LoRA config, batch size and number of optimizer steps,
in one process, one after the other. The framework side is the real `federated-finetune`
flow (Prefect server, tasks, adapter serialization, aggregation, checkpoint, MLflow logging);
the time it spends evaluating (which the plain loop does not do) is reported and subtracted.

    python benchmarks/overhead.py [--steps 20] [-s key=value ...]

Prints a markdown table; writes benchmarks/results/overhead.json. `overhead_ratio` compares the
whole round; because fedtune's loss skips the prompt's output logits its loop is faster than the
plain one, so `overhead_ratio_same_loop` also reports the ratio with the plain loop's speed and
the framework's orchestration time (`orchestration_seconds`) added on top.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import evaluation_seconds, prepared_config, save_results
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from fedtune.config import FedConfig
from fedtune.data.partition import read_split
from fedtune.models import DTYPES
from fedtune.peft_methods import PEFT_METHODS
from fedtune.runtime import encode_records, tokenizer_for


def plain_peft_loop(
    config: FedConfig, data: list[dict[str, list[int]]], steps: int, pad_id: int, out_dir: Path
) -> dict[str, float]:
    """The textbook loop: right-padded batches, the model's own loss, AdamW, save_pretrained."""
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(config.model.name_or_path, dtype=DTYPES[config.model.dtype])
    model = get_peft_model(model, PEFT_METHODS.get(config.peft.method)(config.peft))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.train.lr)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=generator).tolist()
    bs, tokens = config.train.batch_size, 0
    model.train()
    loop_start = time.perf_counter()
    for step in range(steps):
        rows = [data[order[(step * bs + i) % len(data)]] for i in range(bs)]
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in rows])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        tokens += int(mask.sum())
    loop_seconds = time.perf_counter() - loop_start
    model.save_pretrained(out_dir / "plain_adapter")
    return {"seconds": time.perf_counter() - start, "loop_seconds": loop_seconds, "tokens": tokens}


def framework_round(config: FedConfig, steps: int) -> dict[str, float]:
    """Run the real flow for one round and take out the evaluation time it reports."""
    from mlflow import MlflowClient

    from flows.federated_finetune import federated_finetune

    start = time.perf_counter()
    summary = federated_finetune(config=config, prepare_data=False)
    wall = time.perf_counter() - start
    eval_seconds, _ = evaluation_seconds(config.federation.output_dir)
    metrics = MlflowClient(config.tracking.tracking_uri).get_run(summary["mlflow_run_id"]).data.metrics
    return {
        "wall": wall,
        "eval": eval_seconds,
        "seconds": wall - eval_seconds,
        "train_seconds": metrics["client_0/seconds"],
        "tokens": metrics["client_0/tokens"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="framework overhead vs a plain peft loop")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("-s", "--set", action="append", default=[], help="config override dotted.key=value")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = prepared_config(
            root,
            [
                "federation.rounds=1",
                "federation.clients_per_round=1",
                "data.partition.num_clients=1",
                "data.partition.scheme=iid",
                f"train.steps_per_round={args.steps}",
                "eval.generation_samples=0",
                *args.set,
            ],
        )
        tokenizer = tokenizer_for(config)
        data = encode_records(config, tokenizer, read_split(config.data.partitions_dir, 0, "train"))
        framework_round(config, args.steps)  # warm-up: Prefect server start, MLflow schema, file caches
        plain = plain_peft_loop(config, data, args.steps, tokenizer.pad_token_id, root)
        framework = framework_round(config, args.steps)

    result = {
        "steps": args.steps,
        "batch_size": config.train.batch_size,
        "dtype": config.model.dtype,
        "plain_seconds": plain["seconds"],
        "plain_loop_seconds": plain["loop_seconds"],
        "plain_train_tokens_per_s": plain["tokens"] / plain["loop_seconds"],
        "framework_seconds": framework["seconds"],
        "framework_eval_seconds_excluded": framework["eval"],
        "framework_loop_seconds": framework["train_seconds"],
        "framework_train_tokens_per_s": framework["tokens"] / framework["train_seconds"],
        "overhead_ratio": framework["seconds"] / plain["seconds"],
        # what the framework adds around an equally fast loop: Prefect tasks, model loads,
        # serialization, aggregation, checkpoint, MLflow logging
        "orchestration_seconds": framework["seconds"] - framework["train_seconds"],
        "overhead_ratio_same_loop": (plain["loop_seconds"] + framework["seconds"] - framework["train_seconds"])
        / plain["seconds"],
    }
    save_results("overhead", result)
    print("| quantity | value |\n| --- | --- |")
    for key, value in result.items():
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")


if __name__ == "__main__":
    main()
