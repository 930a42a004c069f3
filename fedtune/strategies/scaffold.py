"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", Alg. 1 with control-variate option II).

The server keeps a control variate c, each client i its own c_i (in its private folder, one file
per round, so a recomputed round starts from the same c_i). Clients correct every local gradient
by (c - c_i): here a loss term <w, c - c_i> whose gradient is exactly that. After K local steps at
learning rate eta_l the client sets c_i+ = c_i - c + (x - y_i) / (K eta_l) and sends its update
Delta y_i = y_i - x together with Delta c_i = c_i+ - c_i. The server steps
x <- x + eta_g mean_i(Delta y_i) and c <- c + (1/N) sum_i Delta c_i over the N clients of the
federation. Means are uniform over the round's clients, as in the paper.

Option II assumes plain SGD; with fedtune's AdamW the correction still enters through the gradient
and c_i+ uses the configured learning rate as eta_l, an approximation (documented in the docs).
The control variates travel beside the update, doubling the upload; they need their own masked
sum, so secure aggregation refuses SCAFFOLD for now.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedtune.model.adapters import AdapterState, check_keys
from fedtune.strategies.base import ClientUpdate, LocalObjective, ServerState, Strategy
from fedtune.strategies.options import CONTROL, ScaffoldOptions

C = "scaffold.c."


class Correction(LocalObjective):
    """<w, c - c_i>: adds (c - c_i) to the gradient of every adapter weight."""

    def __init__(self, drift: AdapterState) -> None:
        self.drift = drift

    def extra_loss(self, named_params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        check_keys(named_params, self.drift, "scaffold")
        total = sum((p * self.drift[key].to(p.device)).sum() for key, p in named_params.items())
        return torch.as_tensor(total)


class Scaffold(Strategy):
    Options = ScaffoldOptions
    options: ScaffoldOptions

    def init_state(self, global_state: AdapterState) -> ServerState:
        return {C + key: torch.zeros_like(tensor) for key, tensor in global_state.items()}

    def client_view(self, server_state: ServerState) -> AdapterState:
        return {key.removeprefix(C): value for key, value in server_state.items() if key.startswith(C)}

    def local_objective(
        self, global_state: AdapterState, server_view: AdapterState, client_state: AdapterState | None = None
    ) -> LocalObjective:
        own = client_state or {}
        return Correction({k: server_view[k] - own.get(k, torch.zeros_like(v)) for k, v in global_state.items()})

    def client_step(
        self,
        global_state: AdapterState,
        local_state: AdapterState,
        server_view: AdapterState,
        client_state: AdapterState | None,
        steps: int,
        lr: float,
    ) -> tuple[dict[str, AdapterState], AdapterState]:
        own = client_state or {k: torch.zeros_like(v) for k, v in global_state.items()}
        scale = 1.0 / (steps * lr)
        new = {k: own[k] - server_view[k] + (global_state[k] - local_state[k]) * scale for k in global_state}
        return {CONTROL: {k: new[k] - own[k] for k in global_state}}, new

    def aggregate(
        self, global_state: AdapterState, updates: list[ClientUpdate], server_state: ServerState
    ) -> tuple[AdapterState, ServerState]:
        if not updates:
            raise ValueError("need at least one update")
        new_global, new_state = {}, dict(server_state)
        for key, x in global_state.items():
            step = sum(u.delta[key].to(torch.float64) for u in updates) / len(updates)
            drift = sum(u.extras[CONTROL][key].to(torch.float64) for u in updates) / self.options.num_clients
            new_global[key] = (x.to(torch.float64) + self.options.server_lr * step).to(x.dtype)
            new_state[C + key] = (server_state[C + key].to(torch.float64) + drift).to(x.dtype)
        return new_global, new_state
