"""Client-level differential privacy: DP-FedAvg with a fixed denominator, accounted with Opacus.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models", Alg. 1: each
update is clipped to L2 norm C (a zero update passes), the clipped updates are summed, Gaussian
noise N(0, (zC)^2) is added to the sum, and the result is divided by the *expected* number of
clients, not by the number that replied. So no single client, whatever example count it
claims and whether or not others drop out, moves the average by more than C / n_expected, and
the noise on the average has standard deviation z * C / n_expected.

Trust model: the aggregator is trusted to add the noise (central DP); it sees clipped individual
updates. With `secagg.enabled` (`distributed=True`) the clients add integer Skellam noise instead
and the server sees only the noised sum (`fedtune.privacy.secagg.skellam`, which also holds its
accountant); adaptive clipping then has no individual norms to count and is refused.

Accounting: each round is one step of the sampled Gaussian mechanism with sampling rate
q = clients_per_round / num_clients, accounted by Opacus' RDP (default) or PRV accountant; our
fixed-size sampling is accounted as Poisson sampling at the same rate, the usual approximation.
The ledger is one row per noised release, (noise multiplier, sampling rate, clip norm, clients
aggregated), as the mechanism ran it; epsilon is computed from those rows, never from the current
config, so a later setting cannot re-price a released round (rel-13). The ledger, the secret that
seeds the noise and the current clip norm live in the checkpointed server state, so a resumed run
continues the same privacy ledger and the same noise. The noise comes from torch's generator
seeded by SHA-256(secret, round), drawn tensor by tensor in sorted key order: reproducible for
resume, unpredictable without the secret, but not a vetted CSPRNG (a known limitation).

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping",
Alg. 1), on when `target_quantile` > 0: each round the server sums the centred bits
1[norm <= C] - 1/2 of the updates, adds N(0, sigma_b^2), and moves C geometrically toward the target
quantile of the norms: C <- C * exp(-eta * (noisy fraction - quantile)). Releasing the count
costs privacy too, so the update's noise multiplier becomes (z^-2 - (2 sigma_b)^-2)^(-1/2): the
pair of releases is then exactly as private as one Gaussian release at multiplier z, which is
what the accountant charges.
"""

from __future__ import annotations

import hashlib
import math
import secrets

import torch

from fedtune.model.adapters import AdapterState, add, clip_to_norm, l2_norm
from fedtune.privacy.accounting import epsilon_of
from fedtune.privacy.dp_options import DPFedAvgOptions, epsilon_spent
from fedtune.strategies.base import ClientUpdate, ServerState, Strategy

SECRET, LEDGER, CLIP = "dp.noise_secret", "dp.ledger", "dp.clip_norm"
Z, Q, CLIPPED_AT, AGGREGATED = range(4)  # the ledger's columns


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent after `rounds` rounds at the given delta."""
    return epsilon_of([(noise_multiplier, sample_rate, rounds)], delta, accountant)


def noised_mean(
    deltas: list[AdapterState], clip_norm: float, noise_multiplier: float, expected: int, generator: torch.Generator
) -> AdapterState:
    """(sum of updates clipped to clip_norm + N(0, (z * clip_norm)^2)) / expected.

    The noise is drawn tensor by tensor in sorted key order, so it is a function of the generator's
    seed alone, whatever order the updates' dicts come in (a resume redraws it bit for bit)."""
    clipped = [clip_to_norm(d, clip_norm) for d in deltas]
    std = noise_multiplier * clip_norm
    result = {}
    for key in sorted(deltas[0]):
        first = deltas[0][key]
        total = torch.stack([c[key].to(torch.float64) for c in clipped]).sum(0)
        noise = torch.normal(0.0, std, size=first.shape, generator=generator, dtype=torch.float64)
        result[key] = ((total + noise) / expected).to(first.dtype)
    return result


def _round_generator(secret: torch.Tensor, round_: int) -> torch.Generator:
    digest = hashlib.sha256(bytes(secret.tolist()) + round_.to_bytes(8, "little")).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class DPFedAvg(Strategy):
    """Options: `DPFedAvgOptions` (fedtune/privacy/dp_options.py), checked when the config is built."""

    Options = DPFedAvgOptions
    options: DPFedAvgOptions

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon after `rounds` releases at this strategy's settings (planning; the run's own
        figure is `spent`, from its ledger)."""
        return self.spent(self.ledger(rounds))

    def ledger(self, rounds: int, clip: float | None = None, clients: int | None = None) -> torch.Tensor:
        """`rounds` ledger rows at this strategy's settings: shape (rounds, 4), float64."""
        row = [
            self.options.noise_multiplier,
            self.options.sample_rate,
            self.options.clip_norm if clip is None else clip,
            self.options.expected_clients if clients is None else clients,
        ]
        return torch.tensor([row] * rounds, dtype=torch.float64).reshape(rounds, 4)

    def spent(self, ledger: torch.Tensor) -> float:
        """Epsilon of the releases in `ledger`: runs of equal (z, q) are phases of the composition."""
        phases: list[list[float]] = []
        for z, q in ledger[:, [Z, Q]].tolist():
            if phases and phases[-1][:2] == [z, q]:
                phases[-1][2] += 1
            else:
                phases.append([z, q, 1])
        o = self.options
        return epsilon_spent([(z, q, int(n)) for z, q, n in phases], o.delta, o.accountant, o.distributed)

    def init_state(self, global_state: AdapterState) -> ServerState:
        secret = torch.tensor(list(secrets.token_bytes(32)), dtype=torch.uint8)
        return {
            SECRET: secret,
            LEDGER: self.ledger(0),
            CLIP: torch.tensor([self.options.clip_norm], dtype=torch.float64),
        }

    def aggregate(
        self, global_state: AdapterState, updates: list[ClientUpdate], server_state: ServerState
    ) -> tuple[AdapterState, ServerState]:
        rounds = len(server_state[LEDGER]) + 1
        clip = float(server_state[CLIP])
        generator = _round_generator(server_state[SECRET], rounds)
        deltas = [u.delta for u in updates]
        mean = noised_mean(deltas, clip, self.options.update_multiplier, self.options.expected_clients, generator)
        new_state = self.released(server_state, len(updates))
        o = self.options
        if o.target_quantile:
            # centred bits (b - 1/2) have sensitivity 1/2, which is where the 2 sigma_b above comes from
            centred = sum(float(l2_norm(d) <= clip) - 0.5 for d in deltas)
            noise = float(torch.normal(0.0, o.count_std, size=(1,), generator=generator))
            noisy = (centred + noise) / o.expected_clients + 0.5
            new_state[CLIP] = torch.tensor([clip * math.exp(-o.clip_learning_rate * (noisy - o.target_quantile))])
        return add(global_state, mean), new_state

    def released(self, server_state: ServerState, clients: int) -> ServerState:
        """The server state after one more noised release of `clients` updates, written in the ledger."""
        row = self.ledger(1, float(server_state[CLIP]), clients)
        return {**server_state, LEDGER: torch.cat([server_state[LEDGER], row])}

    def state_metrics(self, server_state: ServerState) -> dict[str, float]:
        return {
            "dp_epsilon": self.spent(server_state[LEDGER]),
            "dp_delta": self.options.delta,
            "dp_clip_norm": float(server_state[CLIP]),
        }

    def can_continue(self, server_state: ServerState) -> bool:
        planned = torch.cat([server_state[LEDGER], self.ledger(1)])
        target = self.options.target_epsilon
        return target <= 0 or self.spent(planned) <= target
