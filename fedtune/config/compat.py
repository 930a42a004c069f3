"""Every rule that relates two features of a config, collected and reported together.

Each rule is owned by the feature it limits (`@rule("secagg")`): a function of the whole
config that yields the problems it finds, each with the dotted field path to fix. All rules run
on every config, so a config with four independent problems prints four lines. Rules read
fields only; the few that need a strategy's own checks (its options, Krum's client count) or
secure aggregation's parameter arithmetic reach them through the catalog (`FEATURE_CHECKS`), and
only when that feature is chosen, so checking a config that uses neither imports no torch, and
the config never imports an implementation (no import cycle; pyproject's import-linter contracts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune.core.catalog import FEATURE_CHECKS, LABELLED_SCHEMES, STRATEGIES

if TYPE_CHECKING:
    from fedtune.config.schema import FedConfig


@dataclass(frozen=True)
class Problem:
    path: str  # the dotted field to change, e.g. "compression.method"
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


Rule = Callable[["FedConfig"], Iterator[Problem]]
RULES: dict[str, list[Rule]] = {}


def rule(feature: str) -> Callable[[Rule], Rule]:
    """Register a rule owned by `feature` (a config section or field)."""

    def add(check: Rule) -> Rule:
        RULES.setdefault(feature, []).append(check)
        return check

    return add


def problems(config: FedConfig) -> list[Problem]:
    """What every rule finds in `config`, in the order the features were registered."""
    return [found for checks in RULES.values() for check in checks for found in check(config)]


def _outside(path: str, clients: Iterable[int], config: FedConfig, noun: str = "clients ") -> Iterator[Problem]:
    """The clients named at `path` that are not among the partitions."""
    n = config.data.partition.num_clients
    strangers = sorted(c for c in clients if not 0 <= c < n)
    if strangers:
        yield Problem(path, f"{noun}{strangers} are not among the {n} partitions")


def _extras(config: FedConfig) -> tuple[str, ...]:
    """What the strategy sends beside each update (SCAFFOLD's control variates); imports it."""
    return tuple(STRATEGIES.get(config.federation.strategy).extras)


def _needs_plain_updates(path: str, config: FedConfig, under_secagg: str, with_extras: str) -> Iterator[Problem]:
    """A feature that changes which tensors travel, or at which shape, cannot yet be combined with
    secure aggregation (it masks the whole update) or with a strategy's extras (sent per tensor)."""
    if config.secagg.enabled:
        yield Problem(path, under_secagg)
    elif extras := _extras(config):
        yield Problem(path, with_extras.format(strategy=config.federation.strategy, extras=", ".join(extras)))


@rule("federation")
def _sampling(config: FedConfig) -> Iterator[Problem]:
    n = config.data.partition.num_clients
    if config.federation.clients_per_round > n:
        yield Problem(
            "federation.clients_per_round",
            f"{config.federation.clients_per_round} exceeds data.partition.num_clients ({n})",
        )


@rule("federation.strategy")
def _strategy_accepts(config: FedConfig) -> Iterator[Problem]:
    """The strategy's options and its own limits (Krum's client count, FlexLoRA's LoRA only)."""
    if config.federation.strategy == "fedavg" and not config.federation.strategy_options:
        return  # nothing to check, and no reason to import the strategies
    try:
        FEATURE_CHECKS.get("strategy")(config)
    except (ValueError, TypeError, ArithmeticError) as error:  # e.g. Krum's f=.inf: OverflowError
        yield Problem("federation.strategy", str(error))


@rule("data.partition")
def _label_column(config: FedConfig) -> Iterator[Problem]:
    if config.data.partition.scheme in LABELLED_SCHEMES and config.label_column is None:
        yield Problem(
            "data.partition.column",
            f"scheme {config.data.partition.scheme} splits by a label: set it or data.columns.label",
        )


@rule("record_dp")
def _record_dp(config: FedConfig) -> Iterator[Problem]:
    if not config.record_dp.enabled:
        return
    if config.train.grad_accum != 1:
        yield Problem("train.grad_accum", "record_dp.enabled: each step is one Poisson-sampled batch, so it must be 1")
    if STRATEGIES.get(config.federation.strategy).adds_loss_term:
        yield Problem(
            "record_dp.enabled",
            f"{config.federation.strategy} adds a loss on the weights, which DP-SGD cannot clip per example",
        )
    if config.peft.use_dora or config.peft.method == "ia3":
        layers = "DoRA (peft.use_dora)" if config.peft.use_dora else "IA3"
        yield Problem("record_dp.enabled", f"opacus computes no per-example gradients for {layers} layers")


@rule("peft.client_ranks")
def _client_ranks(config: FedConfig) -> Iterator[Problem]:
    ranks = config.peft.client_ranks
    if not ranks:
        return
    yield from _outside("peft.client_ranks", ranks, config)
    yield from _needs_plain_updates(
        "peft.client_ranks",
        config,
        "heterogeneous ranks are not combined with secure aggregation yet (it needs every update at the global rank)",
        "not combined with {strategy}'s {extras} yet (sent at the global rank)",
    )


@rule("federation.personal_modules")
def _personalization(config: FedConfig) -> Iterator[Problem]:
    if not config.federation.personal_modules:
        return
    if config.peft.method in ("prompt_tuning", "prefix_tuning"):
        yield Problem(
            "federation.personal_modules",
            f"{config.peft.method} trains one tensor, so nothing would be left to federate or to keep",
        )
    yield from _needs_plain_updates(
        "federation.personal_modules",
        config,
        "not combined with secure aggregation yet (it masks all)",
        "{strategy} sends {extras} for every adapter tensor; it is not combined with personalization yet",
    )


@rule("secagg")
def _secure_aggregation(config: FedConfig) -> Iterator[Problem]:
    if not config.secagg.enabled:
        return
    if config.compression.method != "none":
        yield Problem(
            "compression.method",
            "secure aggregation encodes each update itself (fixed point inside the masked vector); set it to none",
        )
    if any(True for _ in _strategy_accepts(config)):
        return  # its checks build the strategy: the strategy's own rule reports what is wrong with it
    try:
        FEATURE_CHECKS.get("secagg")(config)
    except ValueError as error:
        path, _, message = str(error).partition(": ")
        yield Problem(path if path.startswith("secagg") else "secagg", message if message else str(error))


@rule("watermark")
def _watermark(config: FedConfig) -> Iterator[Problem]:
    owners = config.watermark.clients
    if not owners:
        return
    yield from _outside("watermark.clients", owners, config, noun="")
    if config.record_dp.enabled:
        yield Problem(
            "watermark.clients", "DP-SGD clips per-example gradients and cannot add the sign loss (record_dp)"
        )
    if config.peft.client_ranks:
        yield Problem("watermark.clients", "not combined with peft.client_ranks (a key is for the global shapes)")
    if "lora" in config.watermark.modules and config.peft.method != "lora":
        yield Problem(
            "watermark.modules",
            f"{config.watermark.modules!r} selects LoRA tensors; peft.method is {config.peft.method}: choose a "
            "pattern of its tensors (e.g. ia3_l, prompt_encoder)",
        )


@rule("distill")
def _distillation(config: FedConfig) -> Iterator[Problem]:
    for field in ("teachers", "client_models"):
        yield from _outside(f"distill.{field}", getattr(config.distill, field), config)
    if config.distill.teachers and config.train.objective != "sft":
        yield Problem("distill.teachers", "the mentee route distills instruction tuning (train.objective=sft)")
    if config.distill.teachers and config.record_dp.enabled:
        yield Problem("distill.teachers", "DP-SGD clips the SFT loss per example, not the distillation loss")
    if config.distill.server_model and config.distill.public_source is None:
        yield Problem("distill.public_source", "distill.server_model: FedCoLLM distills on public data; set it")


@rule("train.objective")
def _objective(config: FedConfig) -> Iterator[Problem]:
    objective, columns = config.train.objective, config.data.columns
    if objective == "pretrain":
        if columns.text is None:
            yield Problem("data.columns.text", "train.objective=pretrain trains on raw text: set the column of it")
        return
    if columns.text is not None:
        yield Problem("data.columns.text", f"raw text is for train.objective=pretrain, not {objective}")
    if objective == "dpo":
        if columns.rejected is None:
            yield Problem("data.columns.rejected", "train.objective=dpo: set the column of dispreferred responses")
        if config.record_dp.enabled:
            yield Problem(
                "record_dp.enabled",
                "train.objective=dpo: DP-SGD clips the SFT loss per example; DP-SGD on preference pairs is not "
                "supported (use the distributed DP of secagg, which works on any update)",
            )
