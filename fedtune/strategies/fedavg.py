"""FedAvg (McMahan et al. 2017): the example-weighted mean of client updates."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtune.adapters import AdapterState, add
from fedtune.strategies.base import ClientUpdate, ServerState, Strategy


def weighted_average(states: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """sum_i w_i * s_i / sum_i w_i, computed in float64 and cast back to each tensor's dtype."""
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    result = {}
    for key, first in states[0].items():
        acc = torch.zeros_like(first, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            acc += state[key].to(torch.float64) * (weight / total)
        result[key] = acc.to(first.dtype)
    return result


class FedAvg(Strategy):
    def aggregate(
        self, global_state: AdapterState, updates: list[ClientUpdate], server_state: ServerState
    ) -> tuple[AdapterState, ServerState]:
        mean_delta = weighted_average([u.delta for u in updates], [u.num_examples for u in updates])
        return add(global_state, mean_delta), dict(server_state)
