"""Byzantine-robust aggregation: a few malicious clients cannot drag the global adapter far.

- Coordinate-wise median and beta-trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates", Alg. 1 and 2).
- Krum and Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
  Tolerant Gradient Descent"): score each update by the squared distances to its n - f - 2
  nearest neighbours and average the m best; correct only when n >= 2f + 3.
- Norm bounding (Sun et al. 2019, "Can You Really Backdoor Federated Learning?"): every update
  is scaled down to L2 norm <= max_norm before the example-weighted mean.

Median, trimmed mean and Krum ignore example counts on purpose: a weight is one more thing an
attacker controls. All of them need every individual update in the clear, so they cannot run
behind secure aggregation, where the server only ever sees the sum (see docs/robustness.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch

from fedtune.model.adapters import AdapterState, Spec, add, clip_to_norm, flatten, unflatten
from fedtune.strategies.base import ClientUpdate, ServerState, Strategy
from fedtune.strategies.fedavg import weighted_average
from fedtune.strategies.options import (
    KrumOptions,
    MultiKrumOptions,
    NormBoundOptions,
    RobustOptions,
    TrimmedMeanOptions,
)


def stack_updates(states: Sequence[AdapterState]) -> tuple[torch.Tensor, Spec]:
    """One float64 row per update and what rebuilds a state from a row."""
    rows, spec = zip(*(flatten(state) for state in states), strict=True)
    return torch.stack(rows), spec[0]


def coordinate_median(states: Sequence[AdapterState]) -> AdapterState:
    """Per coordinate, the median (the mean of the two middle values for an even count)."""
    matrix, spec = stack_updates(states)
    return unflatten(matrix.quantile(0.5, dim=0), spec)


def trimmed_mean(states: Sequence[AdapterState], beta: float) -> AdapterState:
    """Per coordinate, drop the floor(beta * n) largest and smallest values and average the rest."""
    matrix, spec = stack_updates(states)
    n, cut = matrix.shape[0], math.floor(beta * matrix.shape[0])
    if n - 2 * cut < 1:
        raise ValueError(f"trimmed mean with beta={beta} leaves nothing of {n} updates")
    ordered = matrix.sort(dim=0).values
    return unflatten(ordered[cut : n - cut].mean(dim=0), spec)


def krum_scores(matrix: torch.Tensor, f: int) -> torch.Tensor:
    """Each row's sum of squared distances to its n - f - 2 nearest other rows."""
    n = matrix.shape[0]
    distances = torch.cdist(matrix, matrix).square()
    distances.fill_diagonal_(float("inf"))
    return distances.sort(dim=1).values[:, : n - f - 2].sum(dim=1)


def multi_krum(states: Sequence[AdapterState], f: int, m: int) -> tuple[AdapterState, list[int]]:
    """Mean of the m updates with the lowest Krum scores, and their indices."""
    n = len(states)
    if n < 2 * f + 3:
        raise ValueError(f"Krum with f={f} needs at least 2f + 3 = {2 * f + 3} updates, got {n}")
    matrix, spec = stack_updates(states)
    chosen = krum_scores(matrix, f).argsort()[:m].tolist()
    return unflatten(matrix[chosen].mean(dim=0), spec), sorted(chosen)


class CoordinateMedian(Strategy):
    Options = RobustOptions

    def aggregate(
        self, global_state: AdapterState, updates: list[ClientUpdate], server_state: ServerState
    ) -> tuple[AdapterState, ServerState]:
        return add(global_state, coordinate_median([u.delta for u in updates])), dict(server_state)


class TrimmedMean(Strategy):
    Options = TrimmedMeanOptions
    options: TrimmedMeanOptions

    def aggregate(
        self, global_state: AdapterState, updates: list[ClientUpdate], server_state: ServerState
    ) -> tuple[AdapterState, ServerState]:
        return add(global_state, trimmed_mean([u.delta for u in updates], self.options.beta)), dict(server_state)


class MultiKrum(Strategy):
    Options: ClassVar[type[MultiKrumOptions]] = MultiKrumOptions
    options: MultiKrumOptions

    def aggregate(
        self, global_state: AdapterState, updates: list[ClientUpdate], server_state: ServerState
    ) -> tuple[AdapterState, ServerState]:
        mean, _ = multi_krum([u.delta for u in updates], self.options.f, self.options.m)
        return add(global_state, mean), dict(server_state)


class Krum(MultiKrum):
    Options = KrumOptions


class NormBoundedFedAvg(Strategy):
    Options = NormBoundOptions
    options: NormBoundOptions

    def aggregate(
        self, global_state: AdapterState, updates: list[ClientUpdate], server_state: ServerState
    ) -> tuple[AdapterState, ServerState]:
        clipped = [clip_to_norm(u.delta, self.options.max_norm) for u in updates]
        return add(global_state, weighted_average(clipped, [u.num_examples for u in updates])), dict(server_state)
