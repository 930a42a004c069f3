"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks").

Clients minimise their loss plus (mu / 2) ||w - w_global||^2 over the adapter weights, which keeps
local models on skewed data from drifting far from the global one; the server averages as
FedAvg. As in Flower, the strategy only carries mu: the term lives in the clients' objective.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedtune.model.adapters import AdapterState, check_keys
from fedtune.strategies.fedavg import FedAvg
from fedtune.strategies.options import FedProxOptions
from fedtune.training.loss_terms import LocalObjective


class ProximalTerm(LocalObjective):
    def __init__(self, anchor: AdapterState, mu: float) -> None:
        self.anchor, self.mu = anchor, mu

    def extra_loss(self, named_params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        check_keys(named_params, self.anchor, "fedprox")
        total = sum((p - self.anchor[key].to(p.device)).square().sum() for key, p in named_params.items())
        return 0.5 * self.mu * torch.as_tensor(total)


class FedProx(FedAvg):
    Options = FedProxOptions
    options: FedProxOptions

    def local_objective(
        self, global_state: AdapterState, server_view: AdapterState, client_state: AdapterState | None = None
    ) -> LocalObjective:
        return ProximalTerm(global_state, self.options.mu)
