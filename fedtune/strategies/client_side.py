"""The configured strategy's client side, as a client feature: its loss term (FedProx's proximal
term, SCAFFOLD's correction) and what it sends beside the update (SCAFFOLD's control variates),
with the state it keeps between rounds in the client's folder."""

from __future__ import annotations

from typing import Any

from fedtune.model.adapters import AdapterState
from fedtune.strategies.options import build_strategy
from fedtune.training.client_feature import ClientFeature, ClientRound


class StrategyClient(ClientFeature):
    @classmethod
    def enabled(cls, cfg: Any, client: int) -> bool:
        return True

    def prepare_training(self, r: ClientRound) -> None:
        self.strategy = build_strategy(r.cfg)
        self.own: AdapterState | None = r.own_state("strategy")
        r.add_term(self.strategy.local_objective(r.start, r.view, self.own))

    def after_training(self, r: ClientRound) -> None:
        extras, next_own = self.strategy.client_step(r.start, r.local_state, r.view, self.own, r.steps, r.cfg.train.lr)
        r.extras.update(extras)
        self.next_own = next_own

    def finish(self, r: ClientRound) -> None:
        """Kept only once the update is sent: a round whose update never left does not advance it."""
        if self.next_own:
            r.keep("strategy", self.next_own)
