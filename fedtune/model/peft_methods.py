"""PEFT method registry: a method name maps to a builder of its peft config.

Adding a method is one registered function; nothing else switches on the name.
"""

from __future__ import annotations

from pathlib import Path

from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from fedtune.config.schema import PeftSection
from fedtune.core.atomic import staged_directory
from fedtune.core.catalog import PEFT_METHODS
from fedtune.model.adapters import AdapterState


def lora_config(section: PeftSection) -> PeftConfig:
    """LoRA (and QLoRA with `model.quantization`); DoRA and rsLoRA are switches."""
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=section.r,
        lora_alpha=section.alpha,  # type: ignore[arg-type]  # peft divides it by r: a float works (HetLoRA)
        lora_dropout=section.dropout,
        target_modules=list(section.target_modules),
        use_dora=section.use_dora,
        use_rslora=section.use_rslora,
        layers_to_transform=section.layers,
    )


def ia3_config(section: PeftSection) -> PeftConfig:
    """IA3: learned scaling vectors on the target modules' activations (their inputs for feed-forward ones)."""
    return IA3Config(
        task_type=TaskType.CAUSAL_LM,
        target_modules=list(section.target_modules),
        feedforward_modules=list(section.feedforward_modules),
    )


def prompt_tuning_config(section: PeftSection) -> PeftConfig:
    """Soft prompt: trainable embeddings of `num_virtual_tokens` tokens prepended to the input."""
    return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=section.num_virtual_tokens)


def p_tuning_config(section: PeftSection) -> PeftConfig:
    """P-tuning: the soft prompt produced by a small MLP prompt encoder, which is what is trained."""
    return PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=section.num_virtual_tokens,
        encoder_hidden_size=section.encoder_hidden_size,
    )


def prefix_tuning_config(section: PeftSection) -> PeftConfig:
    """Prefix tuning (P-tuning v2): trainable keys and values prepended in every layer."""
    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=section.num_virtual_tokens)


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


TRAINABLE_STATE = "fedtune_trainable_state.safetensors"  # beside peft's files of a prompt-learning adapter


def load_peft_adapter(directory: str | Path) -> AdapterState:
    """The adapter state of a folder written by `save_peft_adapter` or `runtime.export_adapter` (or
    peft's `save_pretrained` for methods whose saved weights are their trainable ones)."""
    folder = Path(directory)
    trainable = folder / TRAINABLE_STATE
    return load_file(str(trainable if trainable.exists() else folder / SAFETENSORS_WEIGHTS_NAME))


def is_prompt_learning(section: PeftSection) -> bool:
    return bool(PEFT_METHODS.get(section.method)(section).is_prompt_learning)
