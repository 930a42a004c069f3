"""Standalone training for the baselines that judge federation: local-only and centralized.

Both start from the same round-0 adapter as the federation and get the same optimizer-step
budget, so the only difference is which data each adapter sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune.config.schema import FedConfig
from fedtune.model.adapters import get_adapter_state, save_state
from fedtune.model.builder import build_peft_model, initial_adapter_state, tokenizer_for
from fedtune.training.loop import local_train
from fedtune.training.tokenized import load_encoded


def train_standalone(
    cfg: FedConfig, *, clients: list[int], steps: int, batch_size: int, seed: int, adapter_path: str | Path
) -> dict[str, Any]:
    tokenizer = tokenizer_for(cfg)
    data = [item for c in clients for item in load_encoded(cfg, tokenizer, c, "train")]
    initial, _ = initial_adapter_state(cfg)
    model = build_peft_model(cfg, initial)
    train_cfg = cfg.train.model_copy(update={"batch_size": batch_size})
    result = local_train(
        model, data, train_cfg, pad_id=tokenizer.pad_token_id, seed=seed, steps=steps, desc=f"clients {clients}"
    )
    save_state(get_adapter_state(model), adapter_path)
    return {
        "clients": clients,
        "adapter_path": str(adapter_path),
        "num_examples": len(data),
        "steps": result.steps,
        "tokens": result.tokens,
        "train_loss_first": result.first_loss,
        "train_loss_last": result.last_loss,
        "train_loss": result.mean_loss,
        "seconds": result.seconds,
    }
