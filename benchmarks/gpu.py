"""One command for a GPU: fedtune's client loop against a plain peft loop, a 3-client round's
overhead, and the AG News comparison at a GPU budget, in one table per part.

    python benchmarks/gpu.py                          # on one large GPU: about 7 min on an H200
    python benchmarks/gpu.py --smoke -s model.name_or_path=DIR --shared DIR   # CPU, tiny model (the suite)

Parts, each timed in this process against a baseline measured in the same run:

1. **peak**: the device's matrix-multiply throughput at the model's own shapes and dtype (every
   linear layer's GEMM at the batch's token count), the practical limit MFU is measured against;
   a large square GEMM beside it for reference.
2. **throughput**: tokens/s and model FLOPs utilization (MFU) of fedtune's client loop
   (`fedtune.training.loop.local_train`, the loop a client round runs) next to the textbook peft loop
   (`overhead.plain_peft_loop`: right padding, the model's own full-logits loss), for the default
   SmolLM2-135M (its real weights) and a SmolLM2-1.7B-shaped model (random weights: throughput
   does not depend on the values, and no 1-2B model can be had offline), in bf16 and as QLoRA
   (bitsandbytes NF4, CUDA only).
3. **round**: `overhead.measure` for 3 clients: one real federated round (Prefect flow, MLflow,
   adapter files, aggregation, checkpoint; its evaluation time taken out) over 3 plain loops.
4. **compare**: AG News FedAvg / local-only / centralized through the real flows
   (`matrix.run_dataset`), every held-out row scored.

Model FLOPs (the MFU numerator) count the work the objective needs, the same for both loops, per
example of n tokens of which r are labelled, with N the base's linear weights in the decoder,
V·d the output layer and N_a the adapter's weights:

    4·N·n + 4·V·d·r + 12·L·d·n² + 6·N_a·n

A frozen weight costs 2 FLOPs per token forward and 2 backward (the input gradient only; no
weight gradient: Kaplan et al. 2020, sec. 2.1, counts 2N forward and 4N backward when the
weights train); attention's score and value products cost 4·L·d·n per token forward and twice
that backward (PaLM, Chowdhery et al. 2022, app. B, 12·L·d·n for training); the output layer
only matters at the r labelled positions (the prompt's logits are not needed); the adapter's
weights train (6 per token). A loop that computes more (the plain loop's full logits) is not
credited for it.

Prints markdown tables; writes gpu.json and gpu.md under --out (after every part, so a run cut
short keeps what it finished) and benchmarks/results/gpu.json at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from common import RESULTS, prepared_config, save_results
from matrix import SHARED, Dataset, datasets_for, judge, run_dataset, table
from overhead import measure, plain_peft_loop
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from fedtune.config.schema import FedConfig
from fedtune.data.loading import load_records
from fedtune.model.builder import build_peft_model
from fedtune.model.loading import load_tokenizer, resolve_device
from fedtune.training.loop import local_train
from fedtune.training.tokenized import encode_records

Encoded = list[dict[str, list[int]]]

# SmolLM2-1.7B's shape (its config.json on the Hugging Face hub), built with random weights
SMOLLM2_1_7B = {
    "vocab_size": 49152,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 8192,
    "rope_theta": 130000,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}


@dataclass(frozen=True)
class Shape:
    """What the FLOPs count needs of a decoder: layers L, width d, the decoder's linear weights N
    (attention and MLP of every layer) and the output layer's V·d."""

    layers: int
    width: int
    linears: list[tuple[int, int]]  # (in, out) of every linear layer of one decoder layer
    vocab: int

    @classmethod
    def of(cls, config: Any) -> Shape:
        d, heads = config.hidden_size, config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", heads) * (getattr(config, "head_dim", None) or d // heads)
        f = config.intermediate_size
        return cls(
            config.num_hidden_layers, d, [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)], config.vocab_size
        )

    @property
    def decoder_weights(self) -> int:
        return self.layers * sum(i * o for i, o in self.linears)

    def flops(self, data: Encoded, adapter_weights: int) -> float:
        """Model FLOPs of one training pass over `data` (the formula in the module docstring)."""
        total = 0.0
        for example in data:
            n = len(example["input_ids"])
            r = sum(label != -100 for label in example["labels"])
            total += 4 * self.decoder_weights * n + 4 * self.vocab * self.width * r
            total += 12 * self.layers * self.width * n * n + 6 * adapter_weights * n
        return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gemm_rate(shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device, repeat: int) -> float:
    """FLOP/s of the (m, k) @ (k, n) products in `shapes`, each run `repeat` times after a warm-up."""
    operands = [
        (torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device))
        for m, k, n in shapes
    ]
    for a, b in operands:
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        for a, b in operands:
            a @ b
    _sync(device)
    return repeat * sum(2 * m * k * n for m, k, n in shapes) / (time.perf_counter() - start)


def peak(
    shape: Shape, tokens: int, labelled: int, dtype: torch.dtype, device: torch.device, smoke: bool
) -> dict[str, float]:
    """The matmul throughput at the model's shapes (one decoder layer's GEMMs at `tokens` rows and
    the output layer's at `labelled` rows) and a square GEMM's, in TFLOP/s."""
    shapes = [(tokens, i, o) for i, o in shape.linears] + [(labelled, shape.width, shape.vocab)]
    square = 512 if smoke else 8192
    repeat = 3 if smoke else 50
    return {
        "model_shapes_tflops": _gemm_rate(shapes, dtype, device, repeat) / 1e12,
        "square_tflops": _gemm_rate([(square, square, square)], dtype, device, 3 if smoke else 10) / 1e12,
        "square_size": square,
    }


def _random_model(directory: Path, spec: dict[str, Any], tokenizer_dir: str, dtype: torch.dtype) -> Path:
    """A model of `spec`'s shape with random weights, saved with the default model's tokenizer."""
    with torch.device(resolve_device("auto")):  # initializing 1.7B weights on a CPU takes minutes
        model = AutoModelForCausalLM.from_config(LlamaConfig(**spec), dtype=dtype)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    del model
    return directory


def _fedtune_loop(config: FedConfig, data: Encoded, steps: int, warmup: int, pad_id: int) -> dict[str, float]:
    model = build_peft_model(config)
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    local_train(model, data, config.train, pad_id=pad_id, seed=1, steps=warmup, desc="warm-up")
    result = local_train(model, data, config.train, pad_id=pad_id, seed=0, steps=steps, desc="timed")
    del model
    return {"tokens": result.tokens, "seconds": result.seconds, "adapter_weights": adapter}


def _compare_loops(
    config: FedConfig, data: Encoded, model: tuple[str, str], precision: str, batch: int, pad_id: int, args: Any
) -> list[dict[str, Any]]:
    """One model x precision x batch: the matmul limit at its shapes, then both loops."""
    label, directory = model
    device = resolve_device(config.model.device)
    shape = Shape.of(AutoConfig.from_pretrained(directory))
    dtype = "float32" if precision == "float32" else "bfloat16"
    cfg = config.model_copy(
        update={
            "model": config.model.model_copy(
                update={
                    "name_or_path": directory,
                    "dtype": dtype,
                    "quantization": "4bit" if precision == "nf4" else "none",
                }
            ),
            "train": config.train.model_copy(update={"batch_size": batch}),
        }
    )
    mean_tokens = statistics.fmean(len(e["input_ids"]) for e in data)
    mean_labelled = statistics.fmean(sum(x != -100 for x in e["labels"]) for e in data)
    matmul = torch.float32 if dtype == "float32" else torch.bfloat16
    limit = peak(shape, int(batch * mean_tokens), int(batch * mean_labelled), matmul, device, args.smoke)
    ours = _fedtune_loop(cfg, data, args.steps, args.warmup, pad_id)
    with tempfile.TemporaryDirectory() as tmp:
        plain = plain_peft_loop(cfg, data, args.steps, pad_id, Path(tmp), warmup=args.warmup)
    flops_per_token = shape.flops(data, ours["adapter_weights"]) / sum(len(e["input_ids"]) for e in data)
    rows = []
    for loop, tokens, seconds in (
        ("fedtune", ours["tokens"], ours["seconds"]),
        ("plain peft", plain["tokens"], plain["loop_seconds"]),
    ):
        rate = tokens / seconds
        rows.append(
            {
                "model": label,
                "precision": precision,
                "batch": batch,
                "loop": loop,
                "tokens_per_s": rate,
                "model_tflops": rate * flops_per_token / 1e12,
                "peak_tflops": limit["model_shapes_tflops"],
                "mfu": rate * flops_per_token / (limit["model_shapes_tflops"] * 1e12),
                "square_tflops": limit["square_tflops"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def throughput(
    config: FedConfig, models: list[tuple[str, str]], precisions: list[str], batches: dict[str, list[int]], args: Any
) -> list[dict[str, Any]]:
    """fedtune's loop and the plain loop on the same model, data, batch and steps, row by row; a
    row that fails (a missing bitsandbytes kernel, say) is recorded and the others still run."""
    tokenizer = load_tokenizer(config.model)
    data = encode_records(config, tokenizer, load_records(config.data))
    rows: list[dict[str, Any]] = []
    for model in models:
        for precision in precisions:
            for batch in batches[model[0]]:
                try:
                    rows += _compare_loops(config, data, model, precision, batch, tokenizer.pad_token_id, args)
                except Exception as error:  # noqa: BLE001
                    traceback.print_exc()
                    rows.append({"model": model[0], "precision": precision, "batch": batch, "error": repr(error)})
    return rows


def throughput_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | precision | batch | loop | tokens/s | model TFLOP/s | matmul limit at its shapes (TFLOP/s) | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['precision']} | {r['batch']} | failed: {r['error'][:120]} | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['batch']} | {r['loop']} | {r['tokens_per_s']:,.0f} "
            f"| {r['model_tflops']:.2f} | {r['peak_tflops']:.1f} | {r['mfu']:.1%} |"
        )
    return "\n".join(lines)


def round_table(result: dict[str, Any]) -> str:
    return "\n".join(
        ["| quantity | value |", "| --- | --- |"]
        + [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in result.items()]
    )


def _part(name: str, results: dict[str, Any], out: Path, run: Callable[[], tuple[Any, str]]) -> None:
    """Run one part; a failure is reported and recorded, and the next part still runs."""
    tick = time.perf_counter()
    try:
        value, text = run()
        results[name] = {"seconds": time.perf_counter() - tick, "result": value}
        results.setdefault("tables", {})[name] = text
        print(f"\n## {name} ({time.perf_counter() - tick:.0f} s)\n\n{text}\n", flush=True)
    except Exception as error:  # noqa: BLE001 (a benchmark part that fails must not lose the others)
        traceback.print_exc()
        results[name] = {"seconds": time.perf_counter() - tick, "error": f"{type(error).__name__}: {error}"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "gpu.md").write_text("\n\n".join(f"## {k}\n\n{v}" for k, v in results.get("tables", {}).items()) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="fedtune on one GPU: throughput, MFU, round overhead, AG News")
    parser.add_argument("--smoke", action="store_true", help="tiny settings that run on a CPU in a minute or two")
    parser.add_argument(
        "--parts", nargs="+", default=["throughput", "round", "compare"], choices=["throughput", "round", "compare"]
    )
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per throughput row")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="AG News comparison: federated rounds")
    parser.add_argument("--round-steps", type=int, default=None, help="AG News comparison: steps per client round")
    parser.add_argument("--examples", type=int, default=None, help="AG News rows (class-balanced; 7,600 = all)")
    parser.add_argument("--shared", type=Path, default=SHARED, help="the folder holding ag_news/")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("-s", "--set", action="append", default=[], help="config override for every run")
    args = parser.parse_args()
    smoke = args.smoke
    args.steps = args.steps or (2 if smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    rounds = args.rounds or (1 if smoke else 10)
    round_steps = args.round_steps or (2 if smoke else 30)
    examples = args.examples or (120 if smoke else 7600)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    device = resolve_device("auto")
    results["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {results['device']}", flush=True)
    eval_batch = [] if smoke else ["eval.batch_size=128"]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        matrix_args = SimpleNamespace(
            datasets=["ag_news"], strategies=["fedavg"], partitions=["dir1.0"], peft=[], eta=[], full=False,
            examples=examples, gsm8k_examples=0, test_fraction=0.25, rounds=rounds, steps=round_steps,
            gsm8k_generation_samples=0, target=0.9, seed=0, out=root / "compare", shared=args.shared,
        )  # fmt: skip
        matrix_args.out.mkdir(parents=True)
        (ag_news,) = datasets_for(matrix_args, matrix_args.out)
        ag_news = Dataset(
            ag_news.name,
            ag_news.clients,
            ag_news.partitions,
            ag_news.strategies,
            [*ag_news.overrides, *eval_batch, *args.set],
        )

        def run_throughput() -> tuple[Any, str]:
            config = prepared_config(root / "throughput", [*ag_news.overrides, "data.partition.scheme=iid"])
            default = config.model.name_or_path
            label = Path(default).name
            models = [(label, default)]
            batches = {label: [config.train.batch_size] if smoke else [8, 64]}
            precisions = ["float32"] if smoke else ["bf16"]
            if not smoke:
                big = _random_model(root / "smollm2-1.7b-random", SMOLLM2_1_7B, default, torch.bfloat16)
                models.append(("SmolLM2-1.7B shape, random weights", str(big)))
                batches["SmolLM2-1.7B shape, random weights"] = [16]
                if torch.cuda.is_available():
                    precisions.append("nf4")
            rows = throughput(config, models, precisions, batches, args)
            return rows, throughput_table(rows)

        def run_round() -> tuple[Any, str]:
            result = measure(root / "round", round_steps, 3, [*ag_news.overrides, *eval_batch, *args.set])
            return result, round_table(result)

        def run_compare() -> tuple[Any, str]:
            rows = run_dataset(ag_news, matrix_args, matrix_args.out)  # type: ignore[arg-type]
            judge(rows, matrix_args.target)
            return rows, table(rows, matrix_args)  # type: ignore[arg-type]

        parts = {"throughput": run_throughput, "round": run_round, "compare": run_compare}
        for name in args.parts:
            _part(name, results, args.out, parts[name])
    if args.out != RESULTS:
        save_results("gpu", results)
    failed = [name for name in args.parts if "error" in results[name]]
    if failed:
        raise SystemExit(f"parts failed: {failed}")


if __name__ == "__main__":
    main()
