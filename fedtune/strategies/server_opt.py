"""Server optimizers over FedAvg's mean update: FedAvgM (Hsu et al. 2019) and FedAdagrad, FedYogi,
FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2).

Each round the server takes Delta, the example-weighted mean of the client updates (what FedAvg
would add), as a negative pseudo-gradient and steps with its own optimizer:

    FedAvgM     m <- beta m + Delta                                      x <- x + eta m
    FedAdagrad  m <- b1 m + (1 - b1) Delta,  v <- v + Delta^2                x <- x + eta m / (sqrt(v) + tau)
    FedYogi     m <- b1 m + (1 - b1) Delta,  v <- v - (1 - b2) Delta^2 sign(v - Delta^2)   (same step)
    FedAdam     m <- b1 m + (1 - b1) Delta,  v <- b2 v + (1 - b2) Delta^2   (same step)

Moments start at zero (as in Flower; the paper allows any v_-1 >= tau^2) and are kept in float64.
They and the round count are the explicit `ServerState`, checkpointed every round, so a resumed
run continues with exactly the same moments. Deliberate difference from Flower: Flower's FedAdam
always multiplies eta by the Adam bias correction sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) at round t
(one round ahead of Kingma & Ba's t); ours follows the paper (no correction) unless
`bias_correction=True`, which applies Kingma & Ba's factor at round t. Flower's FedAdagrad fixes
b1 = 0; ours defaults to it and accepts others. Defaults here are tuned for LoRA adapters (eta 1e-2,
tau 1e-3, Reddi et al.'s recommended tau), not Flower's (eta 0.1, tau 1e-9).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedtune.model.adapters import AdapterState
from fedtune.strategies.base import ClientUpdate, ServerState
from fedtune.strategies.fedavg import FedAvg, mean_update
from fedtune.strategies.options import FedAdagradOptions, FedAdamOptions, FedAvgMOptions, FedYogiOptions

STEP, FIRST, SECOND = "opt.step", "opt.m.", "opt.v."


class ServerOptimizer(FedAvg):
    """FedAvg's mean update, then a step of a server optimizer with moments in the server state."""

    second_moment = True
    options: FedAvgMOptions | FedAdagradOptions  # eta, beta_1, tau

    def init_state(self, global_state: AdapterState) -> ServerState:
        state: ServerState = {STEP: torch.tensor([0])}
        for key, tensor in global_state.items():
            state[FIRST + key] = torch.zeros_like(tensor, dtype=torch.float64)
            if self.second_moment:
                state[SECOND + key] = torch.zeros_like(tensor, dtype=torch.float64)
        return state

    def aggregate_stream(
        self, global_state: AdapterState, updates: Iterable[ClientUpdate], server_state: ServerState
    ) -> tuple[AdapterState, ServerState]:
        return self.apply(global_state, mean_update(updates), server_state)

    def apply(
        self, global_state: AdapterState, delta: AdapterState, server_state: ServerState
    ) -> tuple[AdapterState, ServerState]:
        step = int(server_state[STEP]) + 1
        new_state: ServerState = {STEP: torch.tensor([step])}
        new_global: AdapterState = {}
        rate = self.options.eta * self.correction(step)
        for key, x in global_state.items():
            d = delta[key].to(torch.float64)
            m = self.first(server_state[FIRST + key], d)
            new_state[FIRST + key] = m
            if self.second_moment:
                v = self.second(server_state[SECOND + key], d)
                new_state[SECOND + key] = v
                direction = m / (v.sqrt() + self.options.tau)
            else:
                direction = m
            new_global[key] = (x.to(torch.float64) + rate * direction).to(x.dtype)
        return new_global, new_state

    def state_metrics(self, server_state: ServerState) -> dict[str, float]:
        return {"server_opt_step": float(server_state[STEP])}

    def first(self, m: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        beta_1 = self.options.beta_1
        return beta_1 * m + (1 - beta_1) * delta

    def second(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def correction(self, step: int) -> float:
        return 1.0


class FedAvgM(ServerOptimizer):
    """Server momentum (SGD with momentum on the pseudo-gradient, torch's convention, as Flower's)."""

    second_moment = False

    Options = FedAvgMOptions
    options: FedAvgMOptions

    def first(self, m: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.options.beta_1 * m + delta


class FedAdagrad(ServerOptimizer):
    Options = FedAdagradOptions
    options: FedAdagradOptions

    def second(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return v + delta.square()


class FedYogi(ServerOptimizer):
    Options = FedYogiOptions
    options: FedYogiOptions

    def second(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        squared = delta.square()
        return v - (1 - self.options.beta_2) * squared * torch.sign(v - squared)


class FedAdam(ServerOptimizer):
    Options = FedAdamOptions
    options: FedAdamOptions

    def second(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        beta_2 = self.options.beta_2
        return beta_2 * v + (1 - beta_2) * delta.square()

    def correction(self, step: int) -> float:
        o = self.options
        if not o.bias_correction:
            return 1.0
        return float((1 - o.beta_2**step) ** 0.5 / (1 - o.beta_1**step))
