"""Client-level differential privacy: DP-FedAvg with a fixed denominator, accounted with Opacus.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models", Alg. 1: each
update is clipped to L2 norm C (a zero update passes), the clipped updates are summed, Gaussian
noise N(0, (zC)^2) is added to the sum, and the result is divided by the *expected* number of
clients, not by the number that replied. So no single client, whatever example count it
claims and whether or not others drop out, moves the average by more than C / n_expected, and
the noise on the average has standard deviation z * C / n_expected.

Trust model: the aggregator is trusted to add the noise (central DP); it sees clipped individual
updates. Hiding those needs secure aggregation with noise added by the clients.

Accounting: each round is one step of the sampled Gaussian mechanism with sampling rate
q = clients_per_round / num_clients, accounted by Opacus' RDP (default) or PRV accountant; our
fixed-size sampling is accounted as Poisson sampling at the same rate, the usual approximation.
The accountant's state, (z, q, rounds aggregated), and the secret that seeds the noise live in
the checkpointed server state, so a resumed run continues the same privacy ledger and the same
noise. The noise comes from torch's generator seeded by SHA-256(secret, round): reproducible for
resume, unpredictable without the secret, but not a vetted CSPRNG (a known limitation).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from fedtune.adapters import AdapterState, add, clip_to_norm
from fedtune.strategies.base import ClientUpdate, ServerState, Strategy

ACCOUNTANTS: dict[str, Any] = {"rdp": RDPAccountant, "prv": PRVAccountant}
SECRET, ROUNDS = "dp.noise_secret", "dp.rounds"


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent after `rounds` rounds at the given delta."""
    if rounds == 0:
        return 0.0
    ledger = ACCOUNTANTS[accountant]()
    ledger.history = [(noise_multiplier, sample_rate, rounds)]
    return float(ledger.get_epsilon(delta))


def noised_mean(
    deltas: list[AdapterState], clip_norm: float, noise_multiplier: float, expected: int, generator: torch.Generator
) -> AdapterState:
    """(sum of updates clipped to clip_norm + N(0, (z * clip_norm)^2)) / expected."""
    clipped = [clip_to_norm(d, clip_norm) for d in deltas]
    std = noise_multiplier * clip_norm
    result = {}
    for key, first in deltas[0].items():
        total = torch.stack([c[key].to(torch.float64) for c in clipped]).sum(0)
        noise = torch.normal(0.0, std, size=first.shape, generator=generator, dtype=torch.float64)
        result[key] = ((total + noise) / expected).to(first.dtype)
    return result


def _round_generator(secret: torch.Tensor, round_: int) -> torch.Generator:
    digest = hashlib.sha256(bytes(secret.tolist()) + round_.to_bytes(8, "little")).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class DPFedAvg(Strategy):
    """Options: clip_norm, noise_multiplier, delta, target_epsilon (0 = none), accountant.

    expected_clients and sample_rate default to the config's clients_per_round and
    clients_per_round / num_clients.
    """

    def __init__(
        self,
        *,
        clip_norm: float,
        noise_multiplier: float,
        expected_clients: int,
        sample_rate: float,
        delta: float = 1e-5,
        target_epsilon: float = 0.0,
        accountant: str = "rdp",
    ) -> None:
        problems = []
        if clip_norm <= 0:
            problems.append(f"clip_norm must be positive, got {clip_norm}")
        if noise_multiplier <= 0:
            problems.append(f"noise_multiplier must be positive, got {noise_multiplier}")
        if not 0 < sample_rate <= 1 or expected_clients < 1:
            problems.append(f"sample_rate {sample_rate} / expected_clients {expected_clients} out of range")
        if not 0 < delta < 1:
            problems.append(f"delta must be in (0, 1), got {delta}")
        if accountant not in ACCOUNTANTS:
            problems.append(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {accountant!r}")
        if problems:
            raise ValueError("; ".join(problems))
        self.clip_norm, self.noise_multiplier = float(clip_norm), float(noise_multiplier)
        self.expected, self.sample_rate = int(expected_clients), float(sample_rate)
        self.delta, self.target, self.accountant = float(delta), float(target_epsilon), accountant
        if self.target > 0 and self.epsilon_after(1) > self.target:
            raise ValueError(
                f"target_epsilon {self.target} cannot afford a single round "
                f"(one round spends {self.epsilon_after(1):.3f}); raise noise_multiplier or the target"
            )

    def epsilon_after(self, rounds: int) -> float:
        return epsilon(self.noise_multiplier, self.sample_rate, rounds, self.delta, self.accountant)

    def init_state(self, global_state: AdapterState) -> ServerState:
        secret = torch.tensor(list(secrets.token_bytes(32)), dtype=torch.uint8)
        return {SECRET: secret, ROUNDS: torch.zeros(1, dtype=torch.int64)}

    def aggregate(
        self, global_state: AdapterState, updates: list[ClientUpdate], server_state: ServerState
    ) -> tuple[AdapterState, ServerState]:
        rounds = int(server_state[ROUNDS]) + 1
        generator = _round_generator(server_state[SECRET], rounds)
        mean = noised_mean([u.delta for u in updates], self.clip_norm, self.noise_multiplier, self.expected, generator)
        return add(global_state, mean), {**server_state, ROUNDS: torch.tensor([rounds])}

    def state_metrics(self, server_state: ServerState) -> dict[str, float]:
        return {"dp_epsilon": self.epsilon_after(int(server_state[ROUNDS])), "dp_delta": self.delta}

    def can_continue(self, server_state: ServerState) -> bool:
        return self.target <= 0 or self.epsilon_after(int(server_state[ROUNDS]) + 1) <= self.target
