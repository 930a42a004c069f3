"""Aggregation strategies, looked up by name in the catalog (fedtune.core.catalog), which imports each
strategy's module the first time it is used."""

import inspect
from typing import Any

from fedtune.core.catalog import STRATEGIES
from fedtune.strategies.base import ClientUpdate, LocalObjective, ServerState, Strategy
from fedtune.strategies.fedavg import FedAvg, weighted_average


def build_strategy(config: Any) -> Strategy:
    """The configured strategy with `federation.strategy_options`; bad options name the field.

    Options a strategy declares are filled from the federation's shape and cannot be set by hand:
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
    fixed = sorted(set(federation.strategy_options) & set(derived))
    if fixed:  # a sampling rate the federation does not have would amplify privacy that is not there (rel-05)
        raise ValueError(
            f"federation.strategy_options: {', '.join(fixed)}: derived from the federation's shape "
            "(clients_per_round, num_clients, secagg.enabled, peft.client_ranks), never set as an option"
        )
    options = {k: v for k, v in derived.items() if k in accepted} | dict(federation.strategy_options)
    try:
        return cls(**options)
    except TypeError as error:
        raise ValueError(f"federation.strategy_options for {federation.strategy}: {error}") from None


def check_config(config: Any) -> None:
    """Refuse options the configured strategy does not take and federations it cannot aggregate
    (ValueError naming the field); `fedtune.config.compat` calls this when the config is built."""
    build_strategy(config).check_config(config)


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
