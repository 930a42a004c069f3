"""What the config knows of a strategy without importing it: its options, the federations it refuses
and its traits; and the strategy built from them.

A strategy's aggregation imports torch; its options live here as pydantic models (types, ranges,
every problem at once), so `fedtune check` validates `federation.strategy_options` and each rule
that involves the strategy in a fraction of a second, for every strategy (issue 12). The
implementation class names its model (`Strategy.Options`) and reads `self.options`;
`catalog.STRATEGY_OPTIONS` lists the models under the strategies' names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedtune.config.compat import Problem
from fedtune.core.catalog import STRATEGIES, STRATEGY_OPTIONS

if TYPE_CHECKING:
    from fedtune.strategies.base import Strategy

# Options filled from the federation's shape, never set by hand: a sampling rate the federation
# does not have would amplify privacy that is not there (rel-05).
DERIVED = ("expected_clients", "sample_rate", "num_clients", "distributed", "client_ranks")
CONTROL = "control"  # what a SCAFFOLD client sends beside its update: its control variate's change


class StrategyOptions(BaseModel):
    """FedAvg's options (none), and the traits every strategy declares."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    extras: ClassVar[tuple[str, ...]] = ()  # sent beside each update, per adapter tensor (SCAFFOLD)
    adds_loss_term: ClassVar[bool] = False  # its clients add a term on the weights (FedProx, SCAFFOLD)
    # the aggregate is a function of the example-weighted sum of updates, which secure aggregation computes
    sum_only: ClassVar[bool] = True
    # noise on the sum (DP-FedAvg): behind secure aggregation the clients add it as Skellam shares
    adds_noise: ClassVar[bool] = False

    def check_config(self, config: Any) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Refuse a federation (`FedConfig`) the strategy cannot aggregate correctly: raise ValueError."""


class FedProxOptions(StrategyOptions):
    adds_loss_term: ClassVar[bool] = True
    mu: float = Field(0.01, gt=0, description="weight of the proximal term (mu / 2) ||w - w_global||^2; 0 is fedavg")


class ScaffoldOptions(StrategyOptions):
    extras: ClassVar[tuple[str, ...]] = (CONTROL,)
    adds_loss_term: ClassVar[bool] = True
    sum_only: ClassVar[bool] = False
    num_clients: int = Field(ge=1)
    server_lr: float = Field(1.0, gt=0)


class FedAvgMOptions(StrategyOptions):
    server_lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)

    @property
    def eta(self) -> float:
        return self.server_lr

    @property
    def beta_1(self) -> float:
        return self.momentum

    tau: ClassVar[float] = 0.0  # no second moment


class FedAdagradOptions(StrategyOptions):
    eta: float = Field(1e-2, gt=0)
    beta_1: float = Field(0.0, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)


class FedYogiOptions(FedAdagradOptions):
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.99, ge=0, lt=1)


class FedAdamOptions(FedYogiOptions):
    bias_correction: bool = False


class FlexLoRAOptions(StrategyOptions):
    sum_only: ClassVar[bool] = False
    client_ranks: dict[int, int] = Field(default_factory=dict)

    def check_config(self, config: Any) -> None:
        problems = []
        if config.peft.method != "lora":
            problems.append(f"flexlora aggregates LoRA factor products; peft.method is {config.peft.method!r}")
        if config.federation.personal_modules:
            problems.append("flexlora refactors every LoRA module; federation.personal_modules would split pairs")
        if config.watermark.clients:
            problems.append("flexlora re-factors the adapter by SVD each round, which erases sign watermarks")
        if problems:
            raise ValueError("; ".join(problems))


class RobustOptions(StrategyOptions):
    """Needs each update in the clear: not behind secure aggregation (docs/robustness.md)."""

    sum_only: ClassVar[bool] = False


class TrimmedMeanOptions(RobustOptions):
    beta: float = Field(0.1, ge=0, lt=0.5, description="fraction trimmed at each end, per coordinate")

    def check_config(self, config: Any) -> None:
        clients_per_round = config.federation.clients_per_round
        if clients_per_round - 2 * math.floor(self.beta * clients_per_round) < 1:
            raise ValueError(f"trimmed mean with beta={self.beta} leaves nothing of {clients_per_round} clients")


class MultiKrumOptions(RobustOptions):
    f: int = Field(1, ge=0, description="Byzantine clients tolerated")
    m: int = Field(1, ge=1, description="updates averaged")

    def check_config(self, config: Any) -> None:
        clients_per_round, problems = config.federation.clients_per_round, []
        if clients_per_round < 2 * self.f + 3:
            problems.append(
                f"Krum with f={self.f} needs clients_per_round >= 2f + 3 = {2 * self.f + 3}, got {clients_per_round}"
            )
        if self.m > clients_per_round - self.f:
            problems.append(f"Multi-Krum m={self.m} exceeds clients_per_round - f = {clients_per_round - self.f}")
        if problems:
            raise ValueError("; ".join(problems))


class KrumOptions(MultiKrumOptions):
    m: Literal[1] = 1


class NormBoundOptions(StrategyOptions):
    sum_only: ClassVar[bool] = False  # clips each update, which the server of a secure round never sees
    max_norm: float = Field(1.0, gt=0)


def options_for(config: Any) -> StrategyOptions:
    """The configured strategy's options from `federation.strategy_options` and the federation's
    shape; ValueError naming every field that is wrong."""
    options, found = _checked(config)
    if options is None:
        raise ValueError("; ".join(map(str, found)))
    return options


def _checked(config: Any) -> tuple[StrategyOptions | None, list[Problem]]:
    """The options, validated once, and every problem with them at its field path (None if any)."""
    federation, path, found = config.federation, "federation.strategy_options", []
    fixed = sorted(set(federation.strategy_options) & set(DERIVED))
    if fixed:
        found.append(
            Problem(
                path,
                f"{', '.join(fixed)}: derived from the federation's shape (clients_per_round, num_clients, "
                "secagg.enabled, peft.client_ranks), never set as an option",
            )
        )
    try:
        options = _validated(config, without=fixed)
    except ValidationError as error:
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"])
            message = item["msg"].removeprefix("Value error, ")
            found.append(Problem(f"{path}.{where}" if where else path, f"{federation.strategy}: {message}"))
        return None, found
    return (None if found else options), found


def _validated(config: Any, without: Iterable[str] = ()) -> StrategyOptions:
    federation = config.federation
    model = STRATEGY_OPTIONS.get(federation.strategy)
    derived = {
        "expected_clients": federation.clients_per_round,
        "sample_rate": federation.clients_per_round / config.data.partition.num_clients,
        "num_clients": config.data.partition.num_clients,
        "distributed": config.secagg.enabled,
        "client_ranks": config.peft.client_ranks,
    }
    given = {k: v for k, v in federation.strategy_options.items() if k not in without}
    values = {k: v for k, v in derived.items() if k in model.model_fields} | given
    return model.model_validate(values)


def problems(config: Any) -> Iterator[Problem]:
    """What is wrong with the configured strategy: its options, then the federations it refuses."""
    options, found = _checked(config)
    yield from found
    if options is None:
        return
    try:
        options.check_config(config)
    except ValueError as error:
        yield Problem("federation.strategy", str(error))


def build_strategy(config: Any) -> Strategy:
    """The configured strategy (imports its module), with options checked as `fedtune check` does."""
    return STRATEGIES.get(config.federation.strategy)(options_for(config))
