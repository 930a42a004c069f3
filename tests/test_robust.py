"""Robust aggregation against an attack suite, with the bound each aggregator promises.

Setting: n = 10 clients, f = 2 attackers, honest updates mu + N(0, 0.5^2) per coordinate.
Bound for median, trimmed mean, Krum and Multi-Krum: the aggregate stays within the honest
radius R = max_i ||h_i - mean(h)||_2; median and trimmed mean also stay, per coordinate, inside
the honest range. Norm bounding promises ||agg - mean(h)|| <= f (B + ||mean(h)||) / n.
"""

import math
from statistics import NormalDist

import pytest
import torch

from fedtune.config.schema import ConfigError, build_config
from fedtune.strategies.base import ClientUpdate
from fedtune.strategies.fedavg import FedAvg
from fedtune.strategies.robust import (
    CoordinateMedian,
    Krum,
    MultiKrum,
    NormBoundedFedAvg,
    TrimmedMean,
    coordinate_median,
    krum_scores,
    multi_krum,
    stack_updates,
    trimmed_mean,
)

N, F, SHAPES = 10, 2, {"lora_A": (8, 40), "lora_B": (60, 8)}


def _honest(seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    mu = {k: torch.randn(shape, generator=g) for k, shape in SHAPES.items()}
    return [{k: mu[k] + 0.5 * torch.randn(shape, generator=g) for k, shape in SHAPES.items()} for _ in range(N - F)]


def _mean(states):  # type: ignore[no-untyped-def]
    return {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}


def _dist(a, b) -> float:  # type: ignore[no-untyped-def]
    return math.sqrt(sum(float((a[k] - b[k]).square().sum()) for k in a))


def _norm(a) -> float:  # type: ignore[no-untyped-def]
    return math.sqrt(sum(float(t.square().sum()) for t in a.values()))


def _attack(name: str, honest, seed: int):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed + 1)
    mean = _mean(honest)
    if name == "scaling_x100":
        return [{k: 100 * v for k, v in honest[i].items()} for i in range(F)]
    if name == "sign_flip":
        return [{k: -v for k, v in honest[i].items()} for i in range(F)]
    if name == "gaussian_sigma_10":
        return [{k: 10 * torch.randn(shape, generator=g) for k, shape in SHAPES.items()} for _ in range(F)]
    if name == "little_is_enough":  # Baruch et al. 2019: mean - z * std, z from the cohort size
        s = math.floor(N / 2 + 1) - F
        z = NormalDist().inv_cdf((N - s) / N)
        std = {k: torch.stack([h[k] for h in honest]).std(0) for k in honest[0]}
        return [{k: mean[k] - z * std[k] for k in mean} for _ in range(F)]
    raise KeyError(name)


def _round(strategy, honest, attackers):  # type: ignore[no-untyped-def]
    deltas = honest + attackers
    updates = [ClientUpdate(i, d, num_examples=100) for i, d in enumerate(deltas)]
    zero = {k: torch.zeros(shape) for k, shape in SHAPES.items()}
    aggregate, _ = strategy.aggregate(zero, updates, {})
    return aggregate


ATTACKS = ["scaling_x100", "sign_flip", "gaussian_sigma_10", "little_is_enough"]
ROBUST = {
    "median": CoordinateMedian(),
    "trimmed_mean": TrimmedMean(beta=0.2),
    "krum": Krum(f=F),
    "multi_krum": MultiKrum(f=F, m=3),
}


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("name", sorted(ROBUST))
def test_robust_aggregate_stays_within_the_honest_radius(name: str, attack: str) -> None:
    for seed in range(3):
        honest = _honest(seed)
        mean = _mean(honest)
        radius = max(_dist(h, mean) for h in honest)
        aggregate = _round(ROBUST[name], honest, _attack(attack, honest, seed))
        assert _dist(aggregate, mean) <= radius, (name, attack, seed)
        if name in ("median", "trimmed_mean"):
            for k in SHAPES:
                values = torch.stack([h[k] for h in honest])
                assert torch.all(aggregate[k] >= values.min(0).values - 1e-6)
                assert torch.all(aggregate[k] <= values.max(0).values + 1e-6)


@pytest.mark.parametrize("attack", ATTACKS)
def test_norm_bounding_keeps_its_bound(attack: str) -> None:
    honest = _honest(7)
    mean = _mean(honest)
    bound = 1.1 * max(_norm(h) for h in honest)
    aggregate = _round(NormBoundedFedAvg(max_norm=bound), honest, _attack(attack, honest, 7))
    assert _dist(aggregate, mean) <= F * (bound + _norm(mean)) / N


def test_plain_fedavg_is_dragged_away_so_the_suite_discriminates() -> None:
    honest = _honest(0)
    mean = _mean(honest)
    radius = max(_dist(h, mean) for h in honest)
    assert _dist(_round(FedAvg(), honest, _attack("scaling_x100", honest, 0)), mean) > 10 * radius


def test_hand_computed_median_trimmed_mean_and_krum() -> None:
    states = [{"w": torch.tensor([v, -v])} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    assert coordinate_median(states)["w"].tolist() == [3.0, -3.0]
    assert trimmed_mean(states, 0.2)["w"].tolist() == [3.0, -3.0]  # drops 1 and 100
    matrix, _ = stack_updates(states)
    # f=1: each row sums squared distances to its n - f - 2 = 2 nearest others (distance^2 = 2 * dv^2)
    expected = torch.tensor(
        [2 * (1 + 4), 2 * (1 + 1), 2 * (1 + 1), 2 * (1 + 4), 2 * (96**2 + 97**2)], dtype=torch.float64
    )
    assert torch.allclose(krum_scores(matrix, 1), expected)
    chosen_mean, chosen = multi_krum(states, f=1, m=2)
    assert chosen == [1, 2] and chosen_mean["w"].tolist() == [2.5, -2.5]


def test_cohorts_too_small_are_refused_when_the_config_is_built() -> None:
    krum = {"strategy": "krum", "strategy_options": {"f": 2}, "clients_per_round": 6}
    with pytest.raises(ConfigError, match=r"2f \+ 3 = 7, got 6"):
        build_config({"federation": krum, "data": {"partition": {"num_clients": 6}}})
    with pytest.raises(ConfigError, match="strategy_options.beta: median: Extra inputs"):
        build_config({"federation": {"strategy": "median", "strategy_options": {"beta": 0.1}}})
    with pytest.raises(ValueError, match=r"2f \+ 3"):
        multi_krum([{"w": torch.zeros(1)}] * 4, f=1, m=1)
