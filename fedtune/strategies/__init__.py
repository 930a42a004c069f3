"""Aggregation strategies, looked up by name in one registry."""

from typing import Any

from fedtune.registry import Registry
from fedtune.strategies.base import ClientUpdate, LocalObjective, ServerState, Strategy
from fedtune.strategies.fedavg import FedAvg, weighted_average
from fedtune.strategies.robust import CoordinateMedian, Krum, MultiKrum, NormBoundedFedAvg, TrimmedMean

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
_BUILT_IN: list[tuple[str, type[Strategy]]] = [
    ("fedavg", FedAvg),
    ("median", CoordinateMedian),
    ("trimmed_mean", TrimmedMean),
    ("krum", Krum),
    ("multi_krum", MultiKrum),
    ("norm_bound", NormBoundedFedAvg),
]
for _name, _cls in _BUILT_IN:
    STRATEGIES.register(_name)(_cls)


def build_strategy(federation: Any) -> Strategy:
    """The configured strategy with its options; bad options name the config field."""
    try:
        return STRATEGIES.get(federation.strategy)(**federation.strategy_options)
    except TypeError as error:
        raise ValueError(f"strategy_options for {federation.strategy}: {error}") from None


__all__ = [
    "STRATEGIES",
    "ClientUpdate",
    "FedAvg",
    "LocalObjective",
    "ServerState",
    "Strategy",
    "build_strategy",
    "weighted_average",
]
