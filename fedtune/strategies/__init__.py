"""Aggregation strategies, looked up by name in one registry."""

from fedtune.registry import Registry
from fedtune.strategies.base import ClientUpdate, LocalObjective, ServerState, Strategy
from fedtune.strategies.fedavg import FedAvg, weighted_average

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
STRATEGIES.register("fedavg")(FedAvg)

__all__ = ["STRATEGIES", "ClientUpdate", "FedAvg", "LocalObjective", "ServerState", "Strategy", "weighted_average"]
