"""Framework overhead: one federated round with one client vs the same steps in a plain peft loop.

Both sides use the same model, data, LoRA config, batch size and number of optimizer steps,
in one process, one after the other. The framework side is the real `federated-finetune`
flow (Prefect server, tasks, adapter serialization, aggregation, checkpoint, MLflow logging);
the time it spends evaluating (which the plain loop does not do) is reported and subtracted.

    python benchmarks/overhead.py [--steps 20] [--clients 1] [-s key=value ...]

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
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM

from fedtune.config.schema import FedConfig
from fedtune.core.catalog import PEFT_METHODS
from fedtune.data.partition import read_split
from fedtune.model.builder import tokenizer_for
from fedtune.model.loading import compute_dtype, quantization_config, resolve_device
from fedtune.training.tokenized import encode_records


def plain_peft_loop(
    config: FedConfig, data: list[dict[str, list[int]]], steps: int, pad_id: int, out_dir: Path, warmup: int = 0
) -> dict[str, float]:
    """The textbook loop: right-padded batches, the model's own loss, AdamW, save_pretrained.

    The base model is loaded as fedtune loads it (dtype, bitsandbytes quantization, device), so
    only the loop differs. `warmup` steps run before the timed ones (CUDA kernel selection)."""
    start = time.perf_counter()
    device = resolve_device(config.model.device)
    placement = {} if device.type == "cpu" else {"device_map": {"": device}}
    quantization = quantization_config(config.model)
    model = AutoModelForCausalLM.from_pretrained(
        config.model.name_or_path, dtype=compute_dtype(config.model), quantization_config=quantization, **placement
    )
    if quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, PEFT_METHODS.get(config.peft.method)(config.peft))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.train.lr)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=generator).tolist()
    bs, tokens = config.train.batch_size, 0
    model.train()
    loop_start = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            _synchronize(device)
            loop_start, tokens = time.perf_counter(), 0
        rows = [data[order[(step * bs + i) % len(data)]] for i in range(bs)]
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in rows])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
        loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        tokens += int(mask.sum())
    _synchronize(device)
    loop_seconds = time.perf_counter() - loop_start
    model.save_pretrained(out_dir / "plain_adapter")
    return {"seconds": time.perf_counter() - start, "loop_seconds": loop_seconds, "tokens": tokens}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def framework_round(config: FedConfig) -> dict[str, float]:
    """Run the real flow for one round and take out the evaluation time it reports."""
    from mlflow import MlflowClient

    from flows.federated_finetune import federated_finetune

    start = time.perf_counter()
    summary = federated_finetune(config=config, prepare_data=False)
    wall = time.perf_counter() - start
    eval_seconds, rows = evaluation_seconds(config.federation.output_dir)
    metrics = MlflowClient(config.tracking.tracking_uri).get_run(summary["mlflow_run_id"]).data.metrics
    clients = range(config.federation.clients_per_round)
    return {
        "wall": wall,
        "eval": eval_seconds,
        "seconds": wall - eval_seconds,
        "last_round_eval": float(rows[-1]["eval_seconds"]),
        "last_round": float(rows[-1]["round_seconds"]),
        "train_seconds": sum(metrics[f"client_{c}/seconds"] for c in clients),
        "tokens": sum(metrics[f"client_{c}/tokens"] for c in clients),
    }


def measure(root: Path, steps: int, clients: int, overrides: list[str]) -> dict[str, float | int | str]:
    """One federated round of `clients` clients (all sampled, one after another) against the same
    steps in `clients` plain loops, one per client's data, in this process."""
    config = prepared_config(
        root,
        [
            "federation.rounds=1",
            f"federation.clients_per_round={clients}",
            f"data.partition.num_clients={clients}",
            "data.partition.scheme=iid",
            f"train.steps_per_round={steps}",
            *overrides,
        ],
    )
    tokenizer = tokenizer_for(config)
    framework_round(config)  # warm-up: Prefect server start, MLflow schema, file caches, CUDA kernels
    plain = [
        plain_peft_loop(
            config,
            encode_records(config, tokenizer, read_split(config.data.partitions_dir, c, "train")),
            steps,
            tokenizer.pad_token_id,
            root / f"plain_{c}",
        )
        for c in range(clients)
    ]
    framework = framework_round(config)
    plain_seconds = sum(p["seconds"] for p in plain)
    plain_loop_seconds = sum(p["loop_seconds"] for p in plain)
    return {
        "clients": clients,
        "steps": steps,
        "batch_size": config.train.batch_size,
        "dtype": str(compute_dtype(config.model)).removeprefix("torch."),
        "device": str(resolve_device(config.model.device)),
        "plain_seconds": plain_seconds,
        "plain_loop_seconds": plain_loop_seconds,
        "plain_train_tokens_per_s": sum(p["tokens"] for p in plain) / plain_loop_seconds,
        "framework_seconds": framework["seconds"],
        "framework_eval_seconds_excluded": framework["eval"],
        "framework_loop_seconds": framework["train_seconds"],
        "framework_train_tokens_per_s": framework["tokens"] / framework["train_seconds"],
        "overhead_ratio": framework["seconds"] / plain_seconds,
        # the default evaluation (global test loss, each client's validation loss, generation on
        # eval.generation_samples rows) over the round it ends, as a round with eval.every_rounds=1 runs it
        "round_eval_seconds": framework["last_round_eval"],
        "round_seconds": framework["last_round"],
        "eval_share_of_round": framework["last_round_eval"] / framework["last_round"],
        # what the framework adds around an equally fast loop: Prefect tasks, model loads,
        # serialization, aggregation, checkpoint, MLflow logging
        "orchestration_seconds": framework["seconds"] - framework["train_seconds"],
        "overhead_ratio_same_loop": (plain_loop_seconds + framework["seconds"] - framework["train_seconds"])
        / plain_seconds,
    }


def print_table(result: dict[str, float | int | str]) -> None:
    print("| quantity | value |\n| --- | --- |")
    for key, value in result.items():
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")


def main() -> None:
    parser = argparse.ArgumentParser(description="framework overhead vs a plain peft loop")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("-s", "--set", action="append", default=[], help="config override dotted.key=value")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp), args.steps, args.clients, args.set)
    save_results("overhead", result)
    print_table(result)


if __name__ == "__main__":
    main()
