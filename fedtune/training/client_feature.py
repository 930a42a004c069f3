"""The one interface every optional part of a client's round implements, and the round they shape.

A client's round (`fedtune.round.client.train_client`) is a fixed sequence: receive the global adapter,
load the data, build the model, train, form the update, send it, report. Each feature (a
strategy's client side such as FedProx's term or SCAFFOLD's control variates, heterogeneous
ranks, the mentee route's teacher targets, record-level DP, personalization, watermarks,
compression) hooks into that sequence through `ClientFeature`, in its own module next to its
algorithm; `fedtune.core.catalog.CLIENT_FEATURES` lists them in the order they apply. Adding a feature
touches neither `train_client` nor the coordinator. The rules that limit how features combine
live in `fedtune.config.compat`, which checks a config without importing any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fedtune.model.adapters import AdapterState, load_state, save_state
from fedtune.training.loss_terms import LocalObjective, Terms

if TYPE_CHECKING:
    from fedtune.config.schema import FedConfig

Encoded = list[dict[str, Any]]


@dataclass
class ClientRound:
    """What one client's round holds while its features shape it; each hook reads and sets fields."""

    cfg: FedConfig  # a feature may narrow it for this client (a lower LoRA rank)
    client: int
    round_: int
    private_dir: Path  # the client's own folder: its secrets, ledger and states, never read by the server
    global_state: AdapterState  # the global adapter as this client receives it
    view: AdapterState  # what the strategy shares of the server's state
    tokenizer: Any = None
    train: Encoded = field(default_factory=list)
    val: Encoded = field(default_factory=list)
    steps: int = 0
    model: Any = None
    start: AdapterState = field(default_factory=dict)  # where training starts (update = local - start)
    objective: LocalObjective = field(default_factory=LocalObjective)
    dp: tuple[Any, int] | None = None  # (record_dp section, private noise seed): train by DP-SGD
    local_state: AdapterState = field(default_factory=dict)
    extras: dict[str, AdapterState] = field(default_factory=dict)  # sent beside the update (control variates)
    report: dict[str, float] = field(default_factory=dict)  # fields features add to the client's report
    val_seconds: float = 0.0  # evaluation a feature did, counted with the client's validation time

    def add_term(self, term: LocalObjective) -> None:
        self.objective = Terms(self.objective, term)

    def own_state(self, kind: str) -> AdapterState | None:
        """This client's state of `kind` after its latest round before this one (one file per round,
        so a round that is run again starts from the same state), or None before its first."""
        return own_state(self.private_dir, self.round_, kind)

    def keep(self, kind: str, state: AdapterState) -> None:
        """Save this round's state of `kind` in the client's own folder."""
        save_state(state, self.private_dir / kind / f"round_{self.round_:04d}.safetensors")


def own_state(private_dir: str | Path, round_: int, kind: str = "strategy") -> AdapterState | None:
    files = sorted(Path(private_dir).glob(f"{kind}/round_*.safetensors"))
    earlier = [f for f in files if int(f.stem.removeprefix("round_")) < round_]
    return load_state(earlier[-1]) if earlier else None


class ClientFeature:
    """One optional part of a client's round. Every hook does nothing by default; `train_client`
    calls each enabled feature's hooks in `CLIENT_FEATURES` order at each stage. Its limits on
    other features are rules of `fedtune.config.compat` under its name (checked without torch)."""

    # settings that turn the feature on ({label: config overrides}): docs/combinations.md and
    # tests/test_combinations.py try each against every strategy and PEFT method
    examples: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def enabled(cls, cfg: FedConfig, client: int) -> bool:
        return False

    def configure(self, r: ClientRound) -> None:
        """Before data and model: narrow the config or the received state."""

    def prepare_data(self, r: ClientRound) -> None:
        """The client's encoded train and validation data are loaded: change them."""

    def prepare_training(self, r: ClientRound) -> None:
        """The model holds the global adapter and `r.steps` is known: set the start, add loss terms, DP."""

    def after_training(self, r: ClientRound) -> None:
        """`r.local_state` holds the trained adapter: compute what is sent beside the update."""

    def outgoing(self, r: ClientRound, update: AdapterState) -> AdapterState:
        """The update (local - start) as it leaves: keep parts back, compress."""
        return update

    def finish(self, r: ClientRound) -> None:
        """The update is sent and the validation loss known: add report fields."""
