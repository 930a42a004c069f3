"""Heterogeneous LoRA ranks by zero padding (HetLoRA, Cho et al. 2024).

The global adapter has rank `peft.r`; a client listed in `peft.client_ranks` trains a lower rank
r_c: the first r_c rows of every lora_A and columns of every lora_B. Its LoRA alpha is rescaled so
that its scale equals the global's (alpha/r, or alpha/sqrt(r) with rsLoRA): the truncated adapter
then computes exactly the global one without the components past r_c, so clients start from the
global model's leading components, and send updates of their own rank (fewer bytes). The server
zero-pads each update back to rank r before aggregating, so the components past r_c receive no
contribution from that client.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedtune.config.schema import PeftSection
from fedtune.model.adapters import AdapterState
from fedtune.training.client_feature import ClientFeature, ClientRound


def rank_of(section: PeftSection, client: int) -> int:
    return section.client_ranks.get(client, section.r)


def client_section(section: PeftSection, rank: int) -> PeftSection:
    """The client's LoRA settings at `rank`, with the global adapter's scale."""
    if rank == section.r:
        return section
    ratio = rank / section.r
    alpha = section.alpha * (math.sqrt(ratio) if section.use_rslora else ratio)
    return section.model_copy(update={"r": rank, "alpha": alpha})


def _rank_axis(key: str) -> int | None:
    """Which axis of a LoRA tensor is its rank (A is r x in, B is out x r); None for the rest."""
    if ".lora_A." in key:
        return 0
    if ".lora_B." in key:
        return 1
    return None


def truncate(state: AdapterState, rank: int) -> AdapterState:
    out = {}
    for key, tensor in state.items():
        axis = _rank_axis(key)
        out[key] = tensor if axis is None else tensor.narrow(axis, 0, rank).clone()
    return out


def pad(state: AdapterState, reference: AdapterState) -> AdapterState:
    """Zero-pad every tensor of `state` to its shape in `reference`."""
    out = {}
    for key, tensor in state.items():
        target = reference[key]
        if tensor.shape == target.shape:
            out[key] = tensor
            continue
        padded = torch.zeros_like(target, dtype=tensor.dtype)
        padded[tuple(slice(0, n) for n in tensor.shape)] = tensor
        out[key] = padded
    return out


class HeterogeneousRank(ClientFeature):
    """HetLoRA: a client with a lower rank trains the global adapter's leading components only, at
    the global scale; the server pads its update back (`pad`)."""

    examples = {"heterogeneous ranks": {"peft": {"client_ranks": {0: 4}}}}

    @classmethod
    def enabled(cls, cfg: Any, client: int) -> bool:
        return rank_of(cfg.peft, client) < cfg.peft.r

    def configure(self, r: ClientRound) -> None:
        rank = rank_of(r.cfg.peft, r.client)
        r.cfg = r.cfg.model_copy(update={"peft": client_section(r.cfg.peft, rank)})
        r.global_state = truncate(r.global_state, rank)
