"""Building blocks shared by client, server and baselines: a fresh PEFT model and encoded splits."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from fedtune.config.schema import FedConfig
from fedtune.core.atomic import staged_directory
from fedtune.model.adapters import AdapterState, get_adapter_state, load_state, set_adapter_state
from fedtune.model.loading import BUILD_LOCK, load_base_model, load_tokenizer
from fedtune.model.peft_methods import (
    TRAINABLE_STATE,
    attach_adapter,
    is_prompt_learning,
    load_peft_adapter,
    save_peft_adapter,
)


def build_peft_model(cfg: FedConfig, adapter: AdapterState | str | Path | None = None) -> PeftModel:
    """Base model + adapter; the adapter is set from a state or a wire file when given."""
    with BUILD_LOCK:
        model = attach_adapter(load_base_model(cfg.model), cfg.peft)
    if adapter is not None:
        set_adapter_state(model, adapter if isinstance(adapter, dict) else load_state(adapter))
    return model


def recorded_base(name_or_path: str) -> str:
    """The base model an exported adapter names: a local folder by its absolute path, so that
    `AutoPeftModelForCausalLM.from_pretrained(adapter)` finds it from any working directory (the
    config's path is relative to the project); a hub id as it is."""
    local = Path(name_or_path).expanduser()
    return str(local.resolve()) if local.is_dir() else name_or_path


def export_adapter(cfg: FedConfig, state: AdapterState, directory: str | Path) -> Path:
    """An adapter folder in peft's save format (`PeftModel.from_pretrained` loads it). Prompt-learning
    methods save what their encoder produces, so peft writes that from a model holding the state,
    and the trainable state goes beside it, for `load_peft_adapter` to continue training from."""
    base = recorded_base(cfg.model.name_or_path)
    if not is_prompt_learning(cfg.peft):
        return save_peft_adapter(state, cfg.peft, base, directory)
    model = build_peft_model(cfg, state)
    model.peft_config["default"].base_model_name_or_path = base
    with staged_directory(directory) as staging:
        model.save_pretrained(str(staging))
        save_file(state, str(staging / TRAINABLE_STATE))
    return Path(directory)


def initial_adapter_state(cfg: FedConfig, start_from: str | Path | None = None) -> tuple[AdapterState, int]:
    """The round-0 global adapter and the base parameter count. The adapter is fresh (identical for
    the same train.seed) or, to continue training, `start_from`: a peft adapter folder whose keys
    must match the configured method's."""
    torch.manual_seed(cfg.train.seed)
    model = build_peft_model(cfg, None if start_from is None else load_peft_adapter(start_from))
    trainable, total = model.get_nb_trainable_parameters()
    return get_adapter_state(model), total - trainable


def tokenizer_for(cfg: FedConfig) -> PreTrainedTokenizerBase:
    return load_tokenizer(cfg.model)
