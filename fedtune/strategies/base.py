"""The Strategy interface: pure server-side aggregation plus hooks for what clients must do.

Shaped after Flower's strategies: the maths is a pure function over adapter states, and any
server memory (FedAdam moments, SCAFFOLD's global control variate) lives in an explicit
`ServerState` that is passed in, returned, and checkpointed every round, never in attributes.
Client-side terms (FedProx's proximal term, SCAFFOLD's correction) come through
`local_objective`, so new strategies need no change in the flows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedtune.model.adapters import AdapterState
from fedtune.strategies.options import StrategyOptions
from fedtune.training.loss_terms import LocalObjective

ServerState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    client: int
    delta: AdapterState  # local - global
    num_examples: int
    extras: dict[str, AdapterState] = field(default_factory=dict)  # e.g. control-variate deltas


class Strategy(ABC):
    """Options are a pydantic model (`Options`, in fedtune/strategies/options.py, with the strategy's
    traits and the federations it refuses), given as `federation.strategy_options`; a strategy is
    built from a validated model, or from keyword arguments validated here (ValueError).

    A client sees `client_view(server_state)` (never the whole server state, which may hold
    secrets such as DP's noise seed), keeps a private state of its own between rounds (SCAFFOLD's
    control variate), and may send adapter-shaped `extras` beside its update."""

    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    options: StrategyOptions

    def __init__(self, options: StrategyOptions | None = None, /, **values: Any) -> None:
        if options is not None and (values or not isinstance(options, self.Options)):
            raise TypeError(f"{type(self).__name__} takes a {self.Options.__name__} or keyword options, not both")
        self.options = options if options is not None else self.Options.model_validate(values)

    @property
    def extras(self) -> tuple[str, ...]:
        """What each client sends beside its update, per adapter tensor (SCAFFOLD's control variates)."""
        return self.Options.extras

    def init_state(self, global_state: AdapterState) -> ServerState:
        return {}

    def client_view(self, server_state: ServerState) -> AdapterState:
        """The part of the server state that clients receive with the global adapter."""
        return {}

    def local_objective(
        self, global_state: AdapterState, server_view: AdapterState, client_state: AdapterState | None = None
    ) -> LocalObjective:
        return LocalObjective()

    def client_step(
        self,
        global_state: AdapterState,
        local_state: AdapterState,
        server_view: AdapterState,
        client_state: AdapterState | None,
        steps: int,
        lr: float,
    ) -> tuple[dict[str, AdapterState], AdapterState]:
        """After local training, on the client: the `extras` to send and the client's next private state."""
        return {}, {}

    def state_metrics(self, server_state: ServerState) -> dict[str, float]:
        """Numbers about the server state worth logging each round (e.g. privacy spent)."""
        return {}

    def can_continue(self, server_state: ServerState) -> bool:
        """Whether one more round is allowed (False once a privacy budget would be exceeded)."""
        return True

    @abstractmethod
    def aggregate(
        self, global_state: AdapterState, updates: list[ClientUpdate], server_state: ServerState
    ) -> tuple[AdapterState, ServerState]:
        """New global state and server state; must not modify its inputs."""

    def aggregate_stream(
        self, global_state: AdapterState, updates: Iterable[ClientUpdate], server_state: ServerState
    ) -> tuple[AdapterState, ServerState]:
        """`aggregate` over updates read one at a time, consuming all of them. Strategies that need
        every update at once (the robust ones) collect them; FedAvg keeps only a running sum."""
        return self.aggregate(global_state, list(updates), server_state)


class StreamingStrategy(Strategy):
    """A strategy that reads updates one at a time (a running sum), so `aggregate` over a list is
    the same computation."""

    def aggregate(
        self, global_state: AdapterState, updates: list[ClientUpdate], server_state: ServerState
    ) -> tuple[AdapterState, ServerState]:
        return self.aggregate_stream(global_state, updates, server_state)

    @abstractmethod
    def aggregate_stream(
        self, global_state: AdapterState, updates: Iterable[ClientUpdate], server_state: ServerState
    ) -> tuple[AdapterState, ServerState]:
        """New global state and server state from updates read once, in order."""
