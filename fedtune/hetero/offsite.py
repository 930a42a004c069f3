"""Offsite-tuning (Xiao et al. 2023; FATE-LLM's FedOST): clients tune a model they never receive.

The model owner keeps the full model. Clients get an *emulator*: the first and last
`adaptor_layers` decoder layers intact (the adaptors, which clients tune, here with LoRA) and the
middle compressed by layer drop (every `keep_every`-th middle layer kept). After federated tuning
on the emulator, the owner renames the adaptor weights back to their layers in the full model
("plug in") and serves the full model with them. What clients saw is the emulator's parameters;
the full middle never leaves the owner.

Layer drop alone leaves a small model's emulator far from the full model (SmolLM2-135M loses
most of its ability when any middle layers go), so the owner can also distill the full model into
the emulator's middle layers on public text (`distill_emulator`), as the offsite-tuning paper
does; `flows/offsite_tuning.py` measures the remaining emulator-vs-full gap either way.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from fedtune.core.atomic import staged_directory
from fedtune.core.errors import InputError
from fedtune.model.adapters import AdapterState

PLAN_FILE = "offsite.json"
LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class EmulatorPlan:
    full_layers: int
    kept: list[int]  # emulator layer j is full layer kept[j]
    adaptors: list[int]  # emulator indices of the adaptor layers (first and last ones)
    full_parameters: int
    emulator_parameters: int

    @property
    def full_adaptors(self) -> list[int]:
        return [self.kept[j] for j in self.adaptors]


def plan(full_layers: int, adaptor_layers: int, keep_every: int) -> list[int]:
    """Full-model indices the emulator keeps: the adaptors and a uniform subset of the middle."""
    if adaptor_layers < 1 or keep_every < 1:
        raise InputError("offsite: adaptor_layers and keep_every must be at least 1")
    if 2 * adaptor_layers >= full_layers:
        raise InputError(
            f"offsite: {adaptor_layers} adaptor layers at each end leave no middle in a {full_layers}-layer model"
        )
    middle = list(range(adaptor_layers, full_layers - adaptor_layers))
    bottom, top = list(range(adaptor_layers)), list(range(full_layers - adaptor_layers, full_layers))
    return bottom + middle[::keep_every] + top


def keep_layers(model: PreTrainedModel, kept: list[int]) -> None:
    """Drop every decoder layer of `model` (in place) but those at the indices `kept`."""
    layers = model.get_decoder().layers
    model.get_decoder().layers = torch.nn.ModuleList([layers[i] for i in kept])
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    for j, layer in enumerate(model.get_decoder().layers):
        layer.self_attn.layer_idx = j  # the KV cache is indexed by position in the stack


def build_emulator(full_dir: str | Path, out_dir: str | Path, adaptor_layers: int, keep_every: int) -> EmulatorPlan:
    """Write the emulator (a loadable model directory with the tokenizer) and its plan, atomically."""
    model = AutoModelForCausalLM.from_pretrained(full_dir, dtype=torch.float32)
    layers = model.get_decoder().layers
    kept = plan(len(layers), adaptor_layers, keep_every)
    full_parameters = sum(p.numel() for p in model.parameters())
    keep_layers(model, kept)
    adaptors = list(range(adaptor_layers)) + list(range(len(kept) - adaptor_layers, len(kept)))
    result = EmulatorPlan(
        full_layers=len(layers),
        kept=kept,
        adaptors=adaptors,
        full_parameters=full_parameters,
        emulator_parameters=sum(p.numel() for p in model.parameters()),
    )
    with staged_directory(out_dir) as staging:
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(full_dir).save_pretrained(staging)
        (staging / PLAN_FILE).write_text(json.dumps(asdict(result), indent=2))
    return result


def distill_emulator(
    full_dir: str | Path,
    emulator_dir: str | Path,
    texts: list[str],
    *,
    steps: int,
    lr: float = 1e-4,
    seed: int = 0,
    every_layer: bool = False,
) -> dict[str, float]:
    """The owner trains the emulator's middle layers (not the adaptors) to give the full model's
    next-token distribution on its own public texts (KL at every token), as offsite-tuning's
    emulator distillation does; layer drop alone leaves a small model's emulator far off.

    `every_layer` trains the adaptors too: the result is then a smaller member of the model's
    family in its own right (a client's own small model), not an emulator for plugging back."""
    plan_ = read_plan(emulator_dir)
    teacher = AutoModelForCausalLM.from_pretrained(full_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(emulator_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(emulator_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    student.requires_grad_(False)
    trained = [layer for j, layer in enumerate(student.get_decoder().layers) if every_layer or j not in plan_.adaptors]
    params = [p for layer in trained for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    student.train()
    for _ in range(steps):
        picked = [texts[int(i)] for i in torch.randint(len(texts), (4,), generator=generator)]
        batch = tokenizer(picked, return_tensors="pt", padding=True, truncation=True, max_length=128)
        mask = batch["attention_mask"].bool()
        with torch.no_grad():
            target = torch.log_softmax(teacher(**batch).logits[mask], dim=-1)
        mine = torch.log_softmax(student(**batch).logits[mask], dim=-1)
        loss = torch.nn.functional.kl_div(mine, target, log_target=True, reduction="batchmean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    student.eval()
    with staged_directory(emulator_dir) as staging:
        student.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / PLAN_FILE).write_text(json.dumps(asdict(plan_), indent=2))
    return {"kl_first": losses[0], "kl_last": sum(losses[-5:]) / len(losses[-5:])} if losses else {}


def read_plan(emulator_dir: str | Path) -> EmulatorPlan:
    return EmulatorPlan(**json.loads((Path(emulator_dir) / PLAN_FILE).read_text()))


def plug_in(state: AdapterState, emulator: EmulatorPlan) -> AdapterState:
    """The emulator's adaptor weights under their full-model layer names."""
    plugged = {}
    for name, tensor in state.items():
        found = LAYER.search(name)
        if found is None or int(found.group(1)) not in emulator.adaptors:
            raise InputError(f"offsite: adapter tensor {name} is not on an adaptor layer {emulator.adaptors}")
        full = emulator.kept[int(found.group(1))]
        plugged[LAYER.sub(f".layers.{full}.", name, count=1)] = tensor
    return plugged
