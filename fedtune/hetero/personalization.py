"""Personalization, FedPer-style (Arivazhagan et al. 2019): adapter tensors whose names match
`federation.personal_modules` stay with each client. They are never sent and never aggregated;
each client keeps its own copy in its private folder (one file per round) and puts it back into
every global adapter it receives. The server aggregates the shared tensors only.

Patterns are regular expressions searched in the adapter's tensor names (for example `lora_B`,
or `layers\\.1\\.` for everything of the second layer).
"""

from __future__ import annotations

import re
import time
from typing import Any

from fedtune.core.errors import InputError
from fedtune.model.adapters import AdapterState, set_adapter_state
from fedtune.training.client_feature import ClientFeature, ClientRound
from fedtune.training.evaluation import loss_and_perplexity


def personal_keys(patterns: list[str], state: AdapterState) -> set[str]:
    compiled = [re.compile(p) for p in patterns]
    return {key for key in state if any(p.search(key) for p in compiled)}


def check_personal_modules(patterns: list[str], state: AdapterState) -> None:
    """Refuse patterns that keep nothing local, a pattern that matches nothing, or keeping
    everything local (nothing would be federated), naming the tensors there are."""
    if not patterns:
        return
    idle = [p for p in patterns if not personal_keys([p], state)]
    if idle:
        examples = ", ".join(sorted(state)[:3])
        raise InputError(
            f"federation.personal_modules: {idle} match no adapter tensor (they are named like {examples})"
        )
    if personal_keys(patterns, state) == set(state):
        raise InputError("federation.personal_modules: every adapter tensor would stay local; nothing is federated")


def shared(state: AdapterState, patterns: list[str]) -> AdapterState:
    local = personal_keys(patterns, state)
    return {key: value for key, value in state.items() if key not in local}


def personal(state: AdapterState, patterns: list[str]) -> AdapterState:
    local = personal_keys(patterns, state)
    return {key: value for key, value in state.items() if key in local}


class Personalization(ClientFeature):
    """The client's own personal tensors go back into the global adapter it starts from, stay out of
    its update, and are kept in its folder; before training its validation loss is measured with
    the personalized and with the plain global adapter."""

    examples = {"personalization": {"federation": {"personal_modules": ["layers\\.0\\."]}}}

    @classmethod
    def enabled(cls, cfg: Any, client: int) -> bool:
        return bool(cfg.federation.personal_modules)

    def prepare_training(self, r: ClientRound) -> None:
        tick = time.perf_counter()
        mine = r.own_state("personal") or {}
        r.start = {**r.start, **mine}
        batch, pad = r.cfg.eval.batch_size, r.tokenizer.pad_token_id
        global_loss = personal_loss = loss_and_perplexity(r.model, r.val, batch_size=batch, pad_id=pad)["loss"]
        if mine:  # before its first round a client has nothing of its own yet
            set_adapter_state(r.model, r.start)
            personal_loss = loss_and_perplexity(r.model, r.val, batch_size=batch, pad_id=pad)["loss"]
        if global_loss is not None and personal_loss is not None:  # a val split that kept nothing: no value
            r.report["val_loss_global"], r.report["val_loss_personal"] = global_loss, personal_loss
        r.val_seconds += time.perf_counter() - tick

    def outgoing(self, r: ClientRound, update: AdapterState) -> AdapterState:
        patterns = r.cfg.federation.personal_modules
        r.keep("personal", personal(r.local_state, patterns))
        return shared(update, patterns)
