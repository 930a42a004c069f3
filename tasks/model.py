"""Base-model preparation and the initial global adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedtune.config.schema import FedConfig
from fedtune.hetero.offsite import build_emulator, distill_emulator
from fedtune.model.adapters import num_parameters, save_state
from fedtune.model.loading import ensure_model
from fedtune.round.initial import initial_global
from fedtune.strategies.options import build_strategy

FP32_BYTES = 4


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def prepare_model(config: FedConfig) -> str:
    """Materialize the base model if missing (it downloads, so it retries)."""
    return ensure_model(config.model)


@task(cache_policy=NO_CACHE)
def initial_adapter(config: FedConfig, out_dir: str, start_from: str | None = None) -> dict[str, Any]:
    """Write the round-0 adapter (fresh, or the peft adapter folder `start_from`) and a fresh
    strategy state; return their paths and the sizes communication is compared against."""
    state, base_parameters = initial_global(config, start_from)
    paths = {
        "global_path": str(Path(out_dir) / "global.safetensors"),
        "server_state_path": str(Path(out_dir) / "server_state.safetensors"),
    }
    save_state(state, paths["global_path"])
    save_state(build_strategy(config).init_state(state), paths["server_state_path"])
    return {
        **paths,
        "adapter_parameters": num_parameters(state),
        "base_parameters": base_parameters,
        "full_update_bytes": base_parameters * FP32_BYTES,
    }


@task(cache_policy=NO_CACHE)
def emulator(config: FedConfig, out_dir: str, adaptor_layers: int, keep_every: int) -> dict[str, Any]:
    """The model owner's compressed emulator of its model, for offsite-tuning clients."""
    from dataclasses import asdict

    return asdict(build_emulator(config.model.name_or_path, out_dir, adaptor_layers, keep_every))


@task(cache_policy=NO_CACHE)
def distill_emulator_task(config: FedConfig, emulator_dir: str, texts: list[str], steps: int) -> dict[str, float]:
    """The owner distills its model into the emulator's middle layers on its public texts."""
    return distill_emulator(config.model.name_or_path, emulator_dir, texts, steps=steps, seed=config.train.seed)
