"""FedAvg (McMahan et al. 2017): the example-weighted mean of client updates.

The mean is a running weighted sum, so aggregating a round holds one update (plus the float64
sum) in memory however many clients took part.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fedtune.model.adapters import AdapterState, add
from fedtune.strategies.base import ClientUpdate, ServerState, StreamingStrategy


class WeightedSum:
    """sum_i w_i * s_i accumulated in float64, one state at a time."""

    def __init__(self) -> None:
        self.sums: AdapterState = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.weight = 0.0

    def add(self, state: AdapterState, weight: float) -> None:
        for key, tensor in state.items():
            term = tensor.to(torch.float64) * weight
            if key in self.sums:
                self.sums[key] += term
            else:
                self.sums[key], self.dtypes[key] = term, tensor.dtype
        self.weight += weight

    def mean(self) -> AdapterState:
        """sum_i w_i * s_i / sum_i w_i, cast back to each tensor's dtype."""
        if not self.sums:
            raise ValueError("need one weight per state and at least one state")
        if self.weight <= 0:
            raise ValueError("weights must sum to a positive number")
        return {key: (total / self.weight).to(self.dtypes[key]) for key, total in self.sums.items()}


def weighted_average(states: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """sum_i w_i * s_i / sum_i w_i, computed in float64 and cast back to each tensor's dtype."""
    if len(states) != len(weights):
        raise ValueError("need one weight per state and at least one state")
    total = WeightedSum()
    for state, weight in zip(states, weights, strict=True):
        total.add(state, float(weight))
    return total.mean()


def mean_update(updates: Iterable[ClientUpdate]) -> AdapterState:
    """The example-weighted mean of the updates' deltas, holding one update at a time."""
    total = WeightedSum()
    for update in updates:
        total.add(update.delta, update.num_examples)
    return total.mean()


class FedAvg(StreamingStrategy):
    def aggregate_stream(
        self, global_state: AdapterState, updates: Iterable[ClientUpdate], server_state: ServerState
    ) -> tuple[AdapterState, ServerState]:
        return self.apply(global_state, mean_update(updates), server_state)

    def apply(
        self, global_state: AdapterState, delta: AdapterState, server_state: ServerState
    ) -> tuple[AdapterState, ServerState]:
        """The server's step with the round's mean update (secure aggregation hands over only that)."""
        return add(global_state, delta), dict(server_state)
