"""Fixed-point encoding of a clipped float update into Z_M, with the example weight inside.

A client clips each coordinate to [-clip, clip], maps it to one of L = 2^level_bits levels with
stochastic rounding (unbiased), multiplies by its integer weight, and appends the weight itself
as a last coordinate. The masked sum therefore carries sum_i w_i q_i and sum_i w_i, from which
the server decodes the weighted mean; its error per coordinate is below one level, 2 clip / (L-1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FixedPoint:
    clip: float
    level_bits: int
    modulus_bits: int

    @property
    def levels(self) -> int:
        return 1 << self.level_bits

    @property
    def step(self) -> float:
        """Width of one level: the bound on the decoded mean's error per coordinate."""
        return 2 * self.clip / (self.levels - 1)

    def check(self, clients: int, max_weight: int) -> None:
        """Refuse parameters whose largest possible sum would wrap around the modulus."""
        largest = clients * max_weight * (self.levels - 1)
        if largest >= 1 << self.modulus_bits:
            raise ValueError(
                f"{clients} clients x weight {max_weight} x {self.levels - 1} levels = {largest} "
                f"exceeds the modulus 2^{self.modulus_bits}"
            )

    def bits_for(self, total_weight: int) -> int:
        """The fewest modulus bits (at least 8) that hold a sum of inputs whose weights add up to
        `total_weight`: every coordinate is below total_weight * (L - 1), the weight coordinate too."""
        return max(8, (total_weight * (self.levels - 1)).bit_length())

    def encode(self, values: np.ndarray, weight: int, rng: np.random.Generator) -> np.ndarray:
        scaled = (np.clip(values.astype(np.float64), -self.clip, self.clip) + self.clip) / self.step
        floor = np.floor(scaled)
        levels = floor + (rng.random(scaled.shape) < scaled - floor)
        quantized = np.minimum(levels, self.levels - 1).astype(np.uint64) * np.uint64(weight)
        return np.concatenate([quantized, np.array([weight], dtype=np.uint64)])

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The weighted mean of the encoded vectors from their sum (mod M, without wrap-around)."""
        weight = float(total[-1])
        if weight <= 0:
            raise ValueError("the aggregate carries no weight")
        return (total[:-1].astype(np.float64) * self.step - self.clip * weight) / weight
