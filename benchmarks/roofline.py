"""Roofline of a client step on this machine (issue 17, part 1): how far fedtune's training step is
from what the hardware can multiply, and where the rest of the time goes.

    python benchmarks/roofline.py [--steps 6] [--profile-steps 3] [-s key=value ...]

1. **limit**: the matrix-multiply throughput at the model's own shapes (one decoder layer's GEMMs
   at a batch's token count and the output layer's at its labelled tokens, as `gpu.peak` takes
   them) in float32 and in bfloat16; `model.dtype: auto` takes bfloat16 only where the hardware
   has it natively.
2. **step**: fedtune's client loop (`local_train`, as a round runs it) at the default settings of
   params.yaml: tokens/s and achieved model FLOP/s, counted as `gpu.Shape.flops` counts them
   (4·N·n + 4·V·d·r + 12·L·d·n² + 6·N_a·n per example; Kaplan et al. 2020 sec. 2.1, PaLM app. B),
   over the limit at the dtype the step ran in.
3. **profile**: the step's CPU time by operator (torch.profiler, self time): the linear layers'
   matrix multiplies, attention, the loss, the optimizer (its own `Optimizer.step` range),
   element-wise work; and the share of the matmul work spent on padding in batches as the loop
   draws them.

Prints markdown tables; writes benchmarks/results/roofline.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from common import prepared_config, save_results
from gpu import Encoded, Shape, _gemm_rate
from transformers import AutoConfig

from fedtune.model.builder import build_peft_model, tokenizer_for
from fedtune.model.loading import compute_dtype
from fedtune.training.loop import local_train
from fedtune.training.tokenized import load_encoded

# a profiler operator -> its row in the table (first prefix that matches)
CATEGORIES = [
    ("aten::mm", "linear layers: matrix multiply"),
    ("aten::addmm", "linear layers: matrix multiply"),
    ("aten::bmm", "linear layers: matrix multiply"),
    ("aten::_scaled_dot_product", "attention"),
    ("aten::_log_softmax", "loss: log-softmax, cross entropy"),
    ("aten::nll_loss", "loss: log-softmax, cross entropy"),
    ("aten::_foreach", "optimizer (AdamW)"),
]


def _category(name: str) -> str:
    return next((row for prefix, row in CATEGORIES if name.startswith(prefix)), "element-wise and other")


def padding_share(data: Encoded, batch: int, draws: int = 500) -> float:
    """The share of a left-padded batch's tokens that are padding, over random batches as the loop
    draws them (uniformly without replacement)."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([len(e["input_ids"]) for e in data])
    padded = real = 0
    for _ in range(draws):
        chosen = lengths[torch.randperm(len(lengths), generator=generator)[:batch]]
        padded += int(chosen.max()) * len(chosen)
        real += int(chosen.sum())
    return 1 - real / padded


def profile(model: Any, data: Encoded, config: Any, pad_id: int, steps: int) -> dict[str, float]:
    """Seconds of CPU time per table row over `steps` optimizer steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        local_train(model, data, config.train, pad_id=pad_id, seed=2, steps=steps, desc="profiled")
    rows: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        rows[_category(event.key)] += event.self_cpu_time_total / 1e6
    return dict(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description="roofline of fedtune's client step")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps (after 2 warm-up steps)")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("-s", "--set", action="append", default=[], help="config override (key=value)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = prepared_config(Path(tmp), args.set)
        tokenizer = tokenizer_for(config)
        data = load_encoded(config, tokenizer, 0, "train")
        shape = Shape.of(AutoConfig.from_pretrained(config.model.name_or_path))
        batch = config.train.batch_size
        tokens = int(batch * statistics.fmean(len(e["input_ids"]) for e in data))
        labelled = int(batch * statistics.fmean(sum(x != -100 for x in e["labels"]) for e in data))
        shapes = [(tokens, i, o) for i, o in shape.linears] + [(labelled, shape.width, shape.vocab)]
        limits = {  # GFLOP/s; bfloat16 repeats less: without native support it is ~50x slower
            name: _gemm_rate(shapes, dtype, torch.device("cpu"), repeat) / 1e9
            for name, dtype, repeat in (("float32", torch.float32, 20), ("bfloat16", torch.bfloat16, 2))
        }
        dtype = str(compute_dtype(config.model)).removeprefix("torch.")
        model = build_peft_model(config)
        adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
        pad = tokenizer.pad_token_id
        local_train(model, data, config.train, pad_id=pad, seed=1, steps=2, desc="warm-up")
        timed = local_train(model, data, config.train, pad_id=pad, seed=0, steps=args.steps, desc="timed")
        flops_per_token = shape.flops(data, adapter) / sum(len(e["input_ids"]) for e in data)
        achieved = timed.tokens / timed.seconds * flops_per_token / 1e9
        ops = profile(model, data, config, pad, args.profile_steps)
    result = {
        "dtype": dtype,
        "batch": batch,
        "matmul_gflops_float32": limits["float32"],
        "matmul_gflops_bfloat16": limits["bfloat16"],
        "step_tokens_per_s": timed.tokens / timed.seconds,
        "step_gflops": achieved,
        "share_of_limit": achieved / limits[dtype],
        "padding_share": padding_share(data, batch),
        "profile_seconds": ops,
    }
    save_results("roofline", result)
    print("| quantity | value |\n| --- | --- |")
    print(f"| matmul limit at the model's shapes, float32 | {limits['float32']:.1f} GFLOP/s |")
    print(f"| matmul limit at the model's shapes, bfloat16 | {limits['bfloat16']:.1f} GFLOP/s |")
    print(f"| dtype `auto` picks here | {dtype} |")
    print(f"| client step (batch {batch}) | {result['step_tokens_per_s']:.0f} tokens/s, {achieved:.1f} GFLOP/s |")
    print(f"| **share of the matmul limit** | **{result['share_of_limit']:.0%}** |")
    print(f"| padding in the step's batches | {result['padding_share']:.0%} of tokens |")
    total = sum(ops.values())
    print(f"\n| where the step's CPU time goes ({args.profile_steps} steps) | seconds | share |\n| --- | --- | --- |")
    for row, seconds in sorted(ops.items(), key=lambda item: -item[1]):
        print(f"| {row} | {seconds:.2f} | {seconds / total:.0%} |")


if __name__ == "__main__":
    main()
