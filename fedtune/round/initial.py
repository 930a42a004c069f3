"""The round-0 global adapter, checked before any client trains against every feature that names
its tensors (personal modules, the watermark's carriers) or needs more than it (teachers)."""

from __future__ import annotations

from pathlib import Path

from fedtune.config.schema import FedConfig
from fedtune.hetero.personalization import check_personal_modules
from fedtune.hetero.teachers import check_teachers
from fedtune.model.adapters import AdapterState
from fedtune.model.builder import initial_adapter_state
from fedtune.privacy.watermark import carriers


def initial_global(cfg: FedConfig, start_from: str | Path | None = None) -> tuple[AdapterState, int]:
    """`initial_adapter_state` (the adapter and the base parameter count), or an InputError naming
    the field of a feature that cannot work with this adapter."""
    state, base_parameters = initial_adapter_state(cfg, start_from)
    check_personal_modules(cfg.federation.personal_modules, state)
    if cfg.watermark.clients:
        carriers({k: v.shape for k, v in state.items()}, cfg.watermark)
    check_teachers(cfg)
    return state, base_parameters
