"""Aggregation strategies, looked up by name in one registry."""

import inspect
from typing import Any

from fedtune.registry import Registry
from fedtune.strategies.base import ClientUpdate, LocalObjective, ServerState, Strategy
from fedtune.strategies.dp_fedavg import DPFedAvg
from fedtune.strategies.fedavg import FedAvg, weighted_average
from fedtune.strategies.fedprox import FedProx
from fedtune.strategies.flexlora import FlexLoRA
from fedtune.strategies.robust import CoordinateMedian, Krum, MultiKrum, NormBoundedFedAvg, TrimmedMean
from fedtune.strategies.scaffold import Scaffold
from fedtune.strategies.server_opt import FedAdagrad, FedAdam, FedAvgM, FedYogi

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
_BUILT_IN: list[tuple[str, type[Strategy]]] = [
    ("fedavg", FedAvg),
    ("median", CoordinateMedian),
    ("trimmed_mean", TrimmedMean),
    ("krum", Krum),
    ("multi_krum", MultiKrum),
    ("norm_bound", NormBoundedFedAvg),
    ("dp_fedavg", DPFedAvg),
    ("fedprox", FedProx),
    ("scaffold", Scaffold),
    ("fedavgm", FedAvgM),
    ("fedadagrad", FedAdagrad),
    ("fedyogi", FedYogi),
    ("fedadam", FedAdam),
    ("flexlora", FlexLoRA),
]
for _name, _cls in _BUILT_IN:
    STRATEGIES.register(_name)(_cls)


def build_strategy(config: Any) -> Strategy:
    """The configured strategy with `federation.strategy_options`; bad options name the field.

    Options a strategy declares but the user left out are filled from the federation's shape:
    `expected_clients` (clients_per_round), `sample_rate` (clients_per_round / num_clients),
    `num_clients`, `distributed` (secagg.enabled: noise added by the clients) and `client_ranks`
    (peft.client_ranks).
    """
    federation = config.federation
    cls = STRATEGIES.get(federation.strategy)
    derived = {
        "expected_clients": federation.clients_per_round,
        "sample_rate": federation.clients_per_round / config.data.partition.num_clients,
        "num_clients": config.data.partition.num_clients,
        "distributed": config.secagg.enabled,
        "client_ranks": config.peft.client_ranks,
    }
    accepted = inspect.signature(cls).parameters
    options = {k: v for k, v in derived.items() if k in accepted} | dict(federation.strategy_options)
    try:
        return cls(**options)
    except TypeError as error:
        raise ValueError(f"federation.strategy_options for {federation.strategy}: {error}") from None


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
