"""Distributed DP under secure aggregation: each client adds its share of Skellam noise.

Agarwal, Kairouz and Liu 2021, "The Skellam Mechanism for Differentially Private Federated
Learning". The server of DP-FedAvg must not add the noise when it only ever sees a masked sum,
and it must not see an un-noised sum either. So each client clips its update to L2 norm C,
scales it to integers (C becomes `units(d)` >= 128 sqrt(d), so rounding inflates the norm by at
most 1/128), rounds stochastically, and adds integer Skellam noise, Poisson(v/2) - Poisson(v/2)
with variance v. A sum of independent Skellams is Skellam, so the masked sum carries noise of
variance m * v from m clients and survives the modular arithmetic exactly. NumPy's Poisson
sampler drifts above rates of ~1e13 (measured), so larger rates are drawn as exact sums of
smaller Poissons.

Dropouts: every client calibrates its share for the fewest clients the round can aggregate
(`min_clients`, the larger of the secure aggregation threshold and `min_fit_clients`); below that
secure aggregation aborts. So any aggregated sum carries at least variance (z * sensitivity)^2 and
the privacy holds whoever drops; more survivors only add noise.

Sensitivity: rounding moves each coordinate by less than one unit, so one client's integer vector
has L2 norm at most units(d) + sqrt(d), and (integers) L1 norm at most its squared L2 norm. The noise
multiplier z is applied to that bound. The accountant charges, per round, the Skellam RDP bound
(the paper's Theorem 3.5): eps(a) <= a D2^2 / (2 mu) + min(((2a - 1) D2^2 + 6 D1) / (4 mu^2),
3 D1 / (2 mu)), at the lower bound D2 = MIN_UNITS = 2^10 (the bound decreases in D2 at fixed z = sqrt(mu) / D2,
so this over-charges), converted to (eps, delta) by Opacus. No amplification by sampling is
claimed: every round is charged as if every client took part (an upper bound when q < 1).

Trust model: the server learns only the noised sum; the clients are trusted to add their noise
(a client that colludes with the server removes its own share, so privacy against a coalition of
c clients rests on the remaining shares: calibrate `min_clients` accordingly).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

MIN_UNITS = 1 << 10  # the fewest integer units the clip norm C is ever scaled to
MAX_RATE = 1e11  # largest Poisson rate drawn in one go (NumPy's sampler is accurate there)
ORDERS = list(range(2, 257))  # the Skellam bound holds for integer orders
TAIL_SIGMAS = 12  # noise beyond 12 std has probability < 1e-32 per coordinate


def units(dim: int) -> int:
    """Integer units of the clip norm: a power of two >= 128 sqrt(dim)."""
    return max(MIN_UNITS, 1 << math.ceil(math.log2(128 * math.sqrt(max(dim, 1)))))


def skellam_rdp(order: int, noise_multiplier: float, sensitivity: float = MIN_UNITS) -> float:
    """RDP of one release at integer `order` (Theorem 3.5, D1 <= D2^2 for integer vectors)."""
    d2sq = sensitivity**2
    mu = noise_multiplier**2 * d2sq
    correction = min(((2 * order - 1) * d2sq + 6 * d2sq) / (4 * mu**2), 3 * d2sq / (2 * mu))
    return order * d2sq / (2 * mu) + correction


def skellam_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """(eps, delta) after `rounds` releases of the distributed Skellam sum."""
    if rounds == 0:
        return 0.0
    # imported here: opacus imports torch, and the encoder's arithmetic (checked with the config) needs neither
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = np.array([rounds * skellam_rdp(order, noise_multiplier) for order in ORDERS])
    with warnings.catch_warnings():  # "optimal order is the smallest": 2 is the smallest the bound allows
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


@dataclass(frozen=True)
class SkellamEncoder:
    """One client's encoding: clip, scale to integers, round, add its noise share; mod 2^bits."""

    clip_norm: float
    noise_multiplier: float
    min_clients: int
    modulus_bits: int
    dim: int

    @property
    def scale(self) -> float:
        return units(self.dim) / self.clip_norm

    @property
    def sensitivity(self) -> float:
        """L2 bound of one client's rounded integer vector."""
        return units(self.dim) + math.sqrt(self.dim)

    @property
    def client_variance(self) -> float:
        return (self.noise_multiplier * self.sensitivity) ** 2 / self.min_clients

    def check(self, clients: int) -> None:
        """Refuse a modulus that the largest plausible sum (signed) could wrap around."""
        largest = clients * self.sensitivity + TAIL_SIGMAS * math.sqrt(clients * self.client_variance)
        if largest >= 1 << (self.modulus_bits - 1):
            raise ValueError(
                f"{clients} clients with distributed noise reach {largest:.3g}, beyond the signed range of "
                f"the modulus 2^{self.modulus_bits}; raise secagg.modulus_bits or lower noise_multiplier"
            )

    def encode(self, vector: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        values = vector.astype(np.float64)
        norm = float(np.linalg.norm(values))
        scaled = values * (self.scale * min(1.0, self.clip_norm / norm) if norm > 0 else 0.0)
        floor = np.floor(scaled)
        rounded = (floor + (rng.random(scaled.shape) < scaled - floor)).astype(np.int64)
        half = self.client_variance / 2
        noise = _poisson(half, scaled.shape, rng) - _poisson(half, scaled.shape, rng)
        return (rounded + noise).astype(np.uint64) & np.uint64((1 << self.modulus_bits) - 1)

    def decode(self, total: np.ndarray, expected: int) -> np.ndarray:
        """The noised sum read as signed integers, back in update units, over the fixed denominator."""
        signed = total.astype(np.int64)
        signed = np.where(signed >= 1 << (self.modulus_bits - 1), signed - (1 << self.modulus_bits), signed)
        return signed.astype(np.float64) / self.scale / expected


def _poisson(rate: float, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Poisson(rate) as the sum of equal parts no larger than MAX_RATE (exact: Poissons add)."""
    parts = max(1, math.ceil(rate / MAX_RATE))
    total = np.zeros(shape, dtype=np.int64)
    for _ in range(parts):
        total += rng.poisson(rate / parts, shape).astype(np.int64)
    return total
