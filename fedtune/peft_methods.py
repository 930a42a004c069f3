"""PEFT method registry: a method name maps to a builder of its peft config.

Adding a method (IA3, prompt tuning, ...) is one registered function; nothing else switches
on the name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from peft import LoraConfig, PeftConfig, PeftModel, TaskType, get_peft_model
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from fedtune.adapters import AdapterState
from fedtune.atomic import staged_directory
from fedtune.config import PeftSection
from fedtune.registry import Registry

PEFT_METHODS: Registry[Callable[[PeftSection], PeftConfig]] = Registry("PEFT method")


@PEFT_METHODS.register("lora")
def lora_config(section: PeftSection) -> PeftConfig:
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=list(section.target_modules),
    )


def attach_adapter(model: PreTrainedModel, section: PeftSection) -> PeftModel:
    """Wrap the frozen base model with a freshly initialized adapter of the configured method."""
    peft_config = PEFT_METHODS.get(section.method)(section)
    missing = [name for name in getattr(peft_config, "target_modules", None) or [] if not _has_module(model, name)]
    if missing:
        raise ValueError(f"peft.target_modules: {missing} match no module of the base model")
    return get_peft_model(model, peft_config)


def _has_module(model: PreTrainedModel, suffix: str) -> bool:
    return any(name.split(".")[-1] == suffix for name, _ in model.named_modules())


def save_peft_adapter(state: dict, section: PeftSection, base_model: str, directory: str | Path) -> Path:
    """Write an adapter state in peft's own format, loadable with `PeftModel.from_pretrained`.

    The state's keys are already peft's saved keys (from `get_peft_model_state_dict`), so the
    directory needs only the method's config beside them; staged and renamed so a crash never
    leaves a directory that looks complete.
    """
    peft_config = PEFT_METHODS.get(section.method)(section)
    peft_config.base_model_name_or_path = base_model
    with staged_directory(directory) as staging:
        peft_config.save_pretrained(str(staging))
        save_file(state, str(staging / SAFETENSORS_WEIGHTS_NAME))
    return Path(directory)


def load_peft_adapter(directory: str | Path) -> AdapterState:
    """The adapter state of a folder written by `save_peft_adapter` (or peft's `save_pretrained`)."""
    return load_file(str(Path(directory) / SAFETENSORS_WEIGHTS_NAME))
