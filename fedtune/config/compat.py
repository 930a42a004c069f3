"""Every rule that relates two features of a config, collected and reported together.

Each rule is owned by the feature it limits (`@rule("secagg")`): a function of the whole
config that yields the problems it finds, each with the dotted field path to fix. All rules run
on every config, so a config with four independent problems prints four lines. Rules read
fields only; those that need a strategy's options and limits or secure aggregation's parameter
arithmetic reach them through the catalog (`STRATEGY_OPTIONS`, `FEATURE_CHECKS`): light modules
without torch, so every config is checked in a fraction of a second (a DP `target_epsilon` alone
prices a round with Opacus' accountant), and the config never imports an implementation (no
import cycle; pyproject's import-linter contracts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune.core.catalog import FEATURE_CHECKS, LABELLED_SCHEMES, STRATEGY_OPTIONS

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
    """What the strategy sends beside each update (SCAFFOLD's control variates)."""
    return tuple(STRATEGY_OPTIONS.get(config.federation.strategy).extras)


def _needs_plain_updates(path: str, config: FedConfig, under_secagg: str, with_extras: str) -> Iterator[Problem]:
    """A feature that changes which tensors travel, or at which shape, cannot yet be combined with
    secure aggregation (it masks the whole update) or with a strategy's extras (sent per tensor)."""
    if config.secagg.enabled:
        yield Problem(path, under_secagg)
    elif extras := _extras(config):
        yield Problem(path, with_extras.format(strategy=config.federation.strategy, extras=", ".join(extras)))


@rule("peft")
def _peft_fields(config: FedConfig) -> Iterator[Problem]:
    peft = config.peft
    if peft.client_ranks and peft.method != "lora":
        yield Problem("peft.client_ranks", f"heterogeneous ranks are for lora, not {peft.method}")
    wrong = {c: r for c, r in peft.client_ranks.items() if not 0 < r <= peft.r}
    if wrong:
        yield Problem("peft.client_ranks", f"{wrong}: each rank must be in 1..r ({peft.r})")
    if peft.layers is not None and (peft.method != "lora" or not peft.layers):
        yield Problem("peft.layers", "a non-empty list of decoder layer indices, for lora")
    stray = sorted(set(peft.feedforward_modules) - set(peft.target_modules))
    if stray:
        yield Problem("peft.feedforward_modules", f"{stray} must also be in target_modules")


@rule("data.columns")
def _one_layout(config: FedConfig) -> Iterator[Problem]:
    columns = config.data.columns
    if columns.text is None and columns.messages is None and (columns.instruction is None or columns.response is None):
        yield Problem("data.columns", "set either `messages` or both `instruction` and `response` (or `text`)")
    if columns.text is not None and columns.rejected is not None:
        yield Problem(
            "data.columns", "`text` (raw text) and `rejected` (preference pairs) are different layouts; set one"
        )


@rule("train")
def _one_budget(config: FedConfig) -> Iterator[Problem]:
    if (config.train.steps_per_round is None) == (config.train.epochs_per_round is None):
        yield Problem("train.steps_per_round", "set exactly one of steps_per_round and epochs_per_round")


@rule("federation")
def _sampling(config: FedConfig) -> Iterator[Problem]:
    n = config.data.partition.num_clients
    if config.federation.clients_per_round > n:
        yield Problem(
            "federation.clients_per_round",
            f"{config.federation.clients_per_round} exceeds data.partition.num_clients ({n})",
        )
    federation = config.federation
    if federation.min_fit_clients > federation.clients_per_round:
        yield Problem(
            "federation.min_fit_clients",
            f"{federation.min_fit_clients} exceeds federation.clients_per_round ({federation.clients_per_round})",
        )
    if federation.cluster_address is not None and federation.runner == "threads":
        yield Problem(
            "federation.cluster_address", "the address of a Dask or Ray cluster: set federation.runner to dask or ray"
        )


@rule("federation.strategy")
def _strategy_accepts(config: FedConfig) -> Iterator[Problem]:
    """The strategy's options and its own limits (Krum's client count, FlexLoRA's LoRA only)."""
    yield from FEATURE_CHECKS.get("strategy")(config)


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
    if STRATEGY_OPTIONS.get(config.federation.strategy).adds_loss_term:
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
    yield from FEATURE_CHECKS.get("secagg")(config)


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
