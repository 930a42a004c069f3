"""Offsite-tuning (Xiao et al. 2023; FATE-LLM's FedOST): clients tune a model they never receive.

The model owner keeps the full model. Clients get an *emulator*: the first and last
`adaptor_layers` decoder layers intact (the adaptors, which clients tune, here with LoRA) and the
middle compressed by layer drop (every `keep_every`-th middle layer kept). After federated tuning
on the emulator, the owner renames the adaptor weights back to their layers in the full model
("plug in") and serves the full model with them. What clients saw is the emulator's parameters;
the full middle never leaves the owner.

Layer drop is the emulator of the offsite-tuning paper without its distillation step (which
needs the owner to train the emulator on public data); the gap it leaves is what
`flows/offsite_tuning.py` measures and reports.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune.adapters import AdapterState
from fedtune.atomic import staged_directory
from fedtune.errors import InputError

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


def build_emulator(full_dir: str | Path, out_dir: str | Path, adaptor_layers: int, keep_every: int) -> EmulatorPlan:
    """Write the emulator (a loadable model directory with the tokenizer) and its plan, atomically."""
    model = AutoModelForCausalLM.from_pretrained(full_dir, dtype=torch.float32)
    layers = model.get_decoder().layers
    kept = plan(len(layers), adaptor_layers, keep_every)
    full_parameters = sum(p.numel() for p in model.parameters())
    model.get_decoder().layers = torch.nn.ModuleList([layers[i] for i in kept])
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    for j, layer in enumerate(model.get_decoder().layers):
        layer.self_attn.layer_idx = j  # the KV cache is indexed by position in the stack
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
