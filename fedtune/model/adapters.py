"""PEFT-only adapter state: out of and into a model, arithmetic on it, and its wire format.

An `AdapterState` holds detached CPU copies of the adapter parameters only (never base
weights). The wire format is safetensors bytes; communication is counted from the length of
the bytes actually produced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from fedtune.core.atomic import atomic_write_bytes
from fedtune.core.errors import InputError

AdapterState = dict[str, torch.Tensor]


class AdapterMismatchError(InputError):
    pass


ENCODER = "prompt_encoder."


def _prompt_encoder(model: PeftModel) -> torch.nn.Module | None:
    """The prompt encoder of a prompt-learning method. Its parameters are what fedtune exchanges:
    peft saves the encoder's *output* (the virtual tokens' embeddings), from which P-tuning's MLP
    or a projected prefix could not be trained further."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not config.is_prompt_learning:
        return None
    return model.prompt_encoder[model.active_adapter]


def _trainable_state(model: PeftModel) -> dict[str, torch.Tensor]:
    encoder = _prompt_encoder(model)
    if encoder is not None:
        return {ENCODER + key: value for key, value in encoder.state_dict().items()}
    # save_embedding_layers=False: with LoRA on an embedding layer peft would otherwise add the
    # frozen embedding matrix itself ("auto"), a base weight that must never travel
    return get_peft_model_state_dict(model, save_embedding_layers=False)


def get_adapter_state(model: PeftModel) -> AdapterState:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in _trainable_state(model).items()}


def set_adapter_state(model: PeftModel, state: AdapterState) -> None:
    """Load an adapter state; any missing or unexpected key is an error, never silently skipped."""
    expected = set(_trainable_state(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise AdapterMismatchError(f"adapter keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    encoder = _prompt_encoder(model)
    if encoder is not None:
        encoder.load_state_dict({key.removeprefix(ENCODER): value for key, value in state.items()})
        return
    rejected = getattr(set_peft_model_state_dict(model, state), "unexpected_keys", [])
    if rejected:
        raise AdapterMismatchError(f"peft rejected keys {rejected[:5]}")


def trainable_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The model's trainable parameters keyed by their `AdapterState` key: exactly the tensors
    that travel, taken from peft's own state dict. peft renames keys per method (it drops the
    adapter name: `.default.` inside LoRA's, a trailing `.default` for IA3's, and more for DoRA's
    magnitudes or prompt encoders), so each key is matched to the parameter whose storage its
    tensor shares, never by a string rule (mosaicml/composer#3363).

    Raises AdapterMismatchError when a trainable parameter is not in the state or a state tensor
    is no trainable parameter (a frozen base weight would then travel)."""
    trainable = {(p.data_ptr(), tuple(p.shape)): (n, p) for n, p in model.named_parameters() if p.requires_grad}
    found: dict[str, torch.nn.Parameter] = {}
    for key, tensor in _trainable_state(model).items():
        match = trainable.pop((tensor.data_ptr(), tuple(tensor.shape)), None)
        if match is None:
            raise AdapterMismatchError(f"{key}: peft's adapter state holds a tensor that is no trainable parameter")
        found[key] = match[1]
    if trainable:
        names = sorted(name for name, _ in trainable.values())
        raise AdapterMismatchError(f"trainable parameters outside peft's adapter state: {names[:5]}")
    return found


def check_keys(params: Mapping[str, torch.Tensor], reference: AdapterState, who: str) -> None:
    """The trainable parameters (`trainable_parameters`) cover exactly the keys of `reference`."""
    if set(params) != set(reference):
        differ = sorted(set(reference) ^ set(params))[:3]
        raise ValueError(f"{who}: the model's trainable weights and the global adapter differ: {differ}")


def subtract(a: AdapterState, b: AdapterState) -> AdapterState:
    """`a - b` per tensor (an update is local - global); inputs are left untouched."""
    return {k: a[k] - b[k] for k in a}


def add(a: AdapterState, b: AdapterState) -> AdapterState:
    return {k: a[k] + b[k] for k in a}


def l2_norm(state: AdapterState) -> float:
    """The L2 norm of all tensors taken together, in float64."""
    return math.sqrt(sum(float(t.to(torch.float64).square().sum()) for t in state.values()))


Spec = list[tuple[str, torch.Size, torch.dtype]]


def flatten(state: AdapterState) -> tuple[torch.Tensor, Spec]:
    """All tensors as one float64 vector (keys sorted) and what rebuilds the state from it."""
    keys = sorted(state)
    spec = [(k, state[k].shape, state[k].dtype) for k in keys]
    return torch.cat([state[k].reshape(-1).to(torch.float64) for k in keys]), spec


def unflatten(vector: torch.Tensor, spec: Spec) -> AdapterState:
    state, offset = {}, 0
    for key, shape, dtype in spec:
        size = math.prod(shape)
        state[key] = vector[offset : offset + size].reshape(shape).to(dtype)
        offset += size
    return state


CLIP_MARGIN = 1e-6


def clip_to_norm(state: AdapterState, max_norm: float) -> AdapterState:
    """The state scaled into the L2 ball of radius max_norm; a zero or small state passes unchanged.

    Scaling lands a hair inside the ball (relative margin CLIP_MARGIN): rounding the scaled
    float32 tensors could otherwise end a few ulps outside it, and DP guarantees need <= max_norm.
    """
    norm = l2_norm(state)
    if norm <= max_norm:
        return dict(state)
    scale = max_norm / norm * (1 - CLIP_MARGIN)
    return {k: (t.to(torch.float64) * scale).to(t.dtype) for k, t in state.items()}


def to_bytes(state: AdapterState, metadata: dict[str, str] | None = None) -> bytes:
    return save_bytes(state, metadata=metadata)


def from_bytes(data: bytes) -> AdapterState:
    """The tensors in sorted key order: safetensors returns them in an order that differs between
    two loads of the same bytes, and anything drawn tensor by tensor must not depend on it (rel-17)."""
    return dict(sorted(load_bytes(data).items()))


def save_state(state: AdapterState, path: str | Path) -> int:
    """Write the wire bytes to `path`; returns their length (the communication cost)."""
    data = to_bytes(state)
    atomic_write_bytes(data, path)
    return len(data)


def load_state(path: str | Path) -> AdapterState:
    return from_bytes(Path(path).read_bytes())


def num_parameters(state: AdapterState) -> int:
    return sum(t.numel() for t in state.values())
