"""The adapter state is exactly the trainable parameters, for every PEFT method (case 13): the keys
come from peft's own state dict, the strategies' loss terms find every parameter by them, and what
travels is the trainable numbers times their dtype size plus the safetensors header."""

from __future__ import annotations

import pytest
import torch

from fedtune.config.schema import build_config
from fedtune.data.loading import load_records
from fedtune.model.adapters import get_adapter_state, to_bytes, trainable_parameters
from fedtune.model.builder import build_peft_model, tokenizer_for
from fedtune.strategies.options import build_strategy
from fedtune.training.loop import local_train
from fedtune.training.tokenized import encode_records
from tests.conftest import tiny_overrides

METHODS = {
    "lora": {},
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "lora-all-linear": {
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    },
    "lora-embeddings-and-output": {"target_modules": ["q_proj", "embed_tokens", "lm_head"]},
    "ia3": {"method": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 4},
    "p_tuning": {"method": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 32},
    "prefix_tuning": {"method": "prefix_tuning", "num_virtual_tokens": 4},
}


@pytest.mark.parametrize("name", list(METHODS))
def test_the_adapter_state_is_exactly_the_trainable_parameters(tmp_path, tiny_model_dir, name) -> None:  # type: ignore[no-untyped-def]
    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    overrides["peft"] |= METHODS[name]
    config = build_config(overrides)
    torch.manual_seed(0)
    model = build_peft_model(config)
    params, state = trainable_parameters(model), get_adapter_state(model)
    assert params.keys() == state.keys()
    assert all(torch.equal(params[k].detach().cpu(), state[k]) for k in state)
    trainable, _ = model.get_nb_trainable_parameters()
    assert sum(t.numel() for t in state.values()) == trainable  # no frozen base weight, none left out
    blob = to_bytes(state)
    header = 8 + int.from_bytes(blob[:8], "little")  # safetensors: 8-byte length, JSON header, raw tensors
    assert len(blob) == header + sum(t.numel() * t.element_size() for t in state.values())

    # every strategy term that reads parameters by name finds them all (FedProx, SCAFFOLD)
    tokenizer = tokenizer_for(config)
    data = encode_records(config, tokenizer, load_records(config.data))[:16]
    for strategy, options in (("fedprox", {"mu": 0.1}), ("scaffold", {})):
        cfg = build_config(
            {**overrides, "federation": {**overrides["federation"], "strategy": strategy, "strategy_options": options}}
        )
        chosen = build_strategy(cfg)
        view = chosen.client_view(chosen.init_state(state))
        objective = chosen.local_objective(state, view, None)
        assert objective.extra_loss(params) is not None
        local_train(model, data, cfg.train, pad_id=tokenizer.pad_token_id, seed=0, steps=1, objective=objective)
    assert any(not torch.equal(state[k], v) for k, v in get_adapter_state(model).items())
