"""The aggregator's part of a round: validate every update, then combine the valid ones.

A client whose task failed or whose update is rejected drops out of the round; the round goes
on while at least `federation.min_fit_clients` valid updates remain, and otherwise aborts
before anything is aggregated (the run resumes from the last completed round).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from fedtune.config.schema import FedConfig
from fedtune.hetero.personalization import shared
from fedtune.hetero.ranks import pad
from fedtune.model.adapters import AdapterState, to_bytes
from fedtune.round.envelope import RoundAborted, UpdateRejected, UpdateValidator
from fedtune.strategies.base import ClientUpdate, ServerState
from fedtune.strategies.options import build_strategy

log = logging.getLogger(__name__)


def aggregate_reports(
    cfg: FedConfig,
    round_: int,
    global_state: AdapterState,
    reports: list[dict[str, Any]],
    server_state: ServerState,
    dropped: list[str] | None = None,
) -> tuple[AdapterState, ServerState, list[str]]:
    """New global and server state, and the reasons of every client left out of this round."""
    strategy = build_strategy(cfg)
    full, global_state = global_state, shared(global_state, cfg.federation.personal_modules)  # the federated part
    validator = UpdateValidator(
        global_state,
        round_,
        max_bytes=2 * len(to_bytes(global_state)) * (1 + len(strategy.extras)),
        max_examples=cfg.federation.max_client_examples,
        extras=strategy.extras,
        ranks=cfg.peft.client_ranks,
    )
    left_out = list(dropped or [])

    def valid_updates() -> Iterator[ClientUpdate]:
        """Read and checked one at a time, so that a streaming strategy holds one update, not all.
        Too few valid ones raise when the strategy asks past the last, before it can return."""
        valid = 0
        for report in reports:
            try:
                delta, extras = validator.split(
                    validator.check(report["client"], report["update_path"], report["num_examples"])
                )
            except UpdateRejected as error:
                log.warning("round %d: rejected %s", round_, error)
                left_out.append(str(error))
                continue
            valid += 1
            yield ClientUpdate(report["client"], pad(delta, global_state), report["num_examples"], extras)
        if valid < cfg.federation.min_fit_clients:
            raise RoundAborted(
                f"round {round_}: {valid} valid updates, federation.min_fit_clients is "
                f"{cfg.federation.min_fit_clients}; left out: {'; '.join(left_out) or 'none'}"
            )

    new_shared, new_server = strategy.aggregate_stream(global_state, valid_updates(), server_state)
    return {**full, **new_shared}, new_server, left_out  # personal tensors keep their initial global values


def round_allowed(cfg: FedConfig, server_state: ServerState) -> bool:
    """False once the strategy's budget (a target epsilon) cannot afford another round."""
    return build_strategy(cfg).can_continue(server_state)


def state_metrics(cfg: FedConfig, server_state: ServerState) -> dict[str, float]:
    return build_strategy(cfg).state_metrics(server_state)
