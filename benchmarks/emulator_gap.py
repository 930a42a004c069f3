"""How far a layer-drop emulator is from the full model, before any distillation.

    python benchmarks/emulator_gap.py [--articles 24]

Next-token loss of SmolLM2-135M-Instruct on the first AG News articles (../shared/data, at most
96 tokens each) with all 30 layers and with the layer subsets that offsite-tuning plans keep.
Prints a markdown table; writes benchmarks/results/emulator_gap.json.
"""

from __future__ import annotations

import argparse
import copy
import csv

import torch
from common import save_results
from matrix import SHARED
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune.hetero.offsite import keep_layers, plan

MODEL = "models/SmolLM2-135M-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description="layer-drop emulator vs the full model")
    parser.add_argument("--articles", type=int, default=24)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    with (SHARED / "ag_news" / "ag_news_7600.csv").open() as handle:
        rows = list(csv.reader(handle))[: args.articles]
    batches = [tokenizer(f"{t}. {d}", return_tensors="pt")["input_ids"][:, :96] for _, t, d in rows]
    full = len(model.get_decoder().layers)
    subsets = {"the full model": list(range(full))}
    for adaptors, every in [(8, 2), (6, 2), (4, 2), (2, 2), (4, 4)]:
        subsets[f"adaptor_layers={adaptors}, keep_every={every}"] = plan(full, adaptors, every)
    subsets["layers 22-27 dropped (contiguous)"] = list(range(22)) + [28, 29]
    results = []
    for name, keep in subsets.items():
        emulator = copy.deepcopy(model)
        keep_layers(emulator, keep)
        with torch.no_grad():
            loss = sum(float(emulator(ids, labels=ids).loss) for ids in batches) / len(batches)
        results.append({"emulator": name, "layers": len(keep), "loss": loss})
    save_results("emulator_gap", results)
    print("| emulator | layers kept | next-token loss |")
    print("| --- | --- | --- |")
    for r in results:
        print(f"| {r['emulator']} | {r['layers']} | {r['loss']:.2f} |")


if __name__ == "__main__":
    main()
