"""DP-FedAvg's options and their privacy arithmetic, checked when the config is built.

Light on purpose (pydantic, math): `fedtune check` validates a DP config without torch. Only a
`target_epsilon` makes the check price one round, which needs an accountant (Opacus, which
imports torch); the import happens there and only then. The mechanism is in `dp_fedavg.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from fedtune.strategies.options import StrategyOptions

Accountant = Literal["rdp", "prv"]  # Opacus' RDP and PRV accountants (fedtune.privacy.accounting)


def epsilon_spent(
    phases: Sequence[tuple[float, float, int]], delta: float, accountant: str, distributed: bool
) -> float:
    """Epsilon after the releases of `phases` ((noise multiplier, sampling rate, rounds) each) at `delta`:
    Opacus' accountant for the server's Gaussian noise, the Skellam RDP bound for the clients' noise
    (secure aggregation; one noise multiplier only). Imports the accountants (torch) when called."""
    if distributed:
        from fedtune.privacy.secagg.skellam import skellam_epsilon

        if len({z for z, _, _ in phases}) > 1:
            raise ValueError("the Skellam accountant composes releases of one noise multiplier only")
        return skellam_epsilon(phases[0][0], sum(n for _, _, n in phases), delta) if phases else 0.0
    from fedtune.privacy.accounting import epsilon_of

    return epsilon_of(phases, delta, accountant)


class DPFedAvgOptions(StrategyOptions):
    """clip_norm, noise_multiplier, delta, target_epsilon (0 = none), accountant, and for adaptive
    clipping target_quantile (0 = off), clip_learning_rate, count_noise_std (McMahan et al. 2018;
    Andrew et al. 2021). expected_clients, sample_rate and distributed come from the federation."""

    adds_noise: ClassVar[bool] = True

    clip_norm: float = Field(gt=0, description="L2 bound of each client's update")
    noise_multiplier: float = Field(gt=0, description="noise std / clip_norm")
    expected_clients: int = Field(ge=1)
    sample_rate: float = Field(gt=0, le=1)
    delta: float = Field(1e-5, gt=0, lt=1)
    target_epsilon: float = Field(0.0, ge=0, description="stop before epsilon would exceed it; 0 = no budget")
    accountant: Accountant = "rdp"
    target_quantile: float = Field(0.0, ge=0, lt=1, description="adaptive clipping's quantile of norms; 0 = off")
    clip_learning_rate: float = Field(0.2, gt=0)
    count_noise_std: float = Field(0.0, ge=0, description="sigma_b; 0 = the paper's default expected_clients / 20")
    distributed: bool = False

    @property
    def count_std(self) -> float:
        return self.count_noise_std or self.expected_clients / 20  # the paper's default, sigma_b = m / 20

    @property
    def update_multiplier(self) -> float:
        """With adaptive clipping part of the budget pays for the count (Andrew et al. 2021, Thm. 1):
        the update's multiplier is (z^-2 - (2 sigma_b)^-2)^(-1/2), so the pair of releases is as private
        as one Gaussian release at z."""
        z = self.noise_multiplier
        return (z**-2 - (2 * self.count_std) ** -2) ** -0.5 if self.target_quantile else z

    @model_validator(mode="after")
    def _consistent(self) -> DPFedAvgOptions:
        problems = []
        if self.target_quantile and not 2 * self.count_std > self.noise_multiplier:
            problems.append(
                f"adaptive clipping needs count_noise_std > noise_multiplier / 2 (got {self.count_std}, "
                f"{self.noise_multiplier})"
            )
        if self.distributed and (self.target_quantile or self.accountant != "rdp"):
            problems.append(
                "with secure aggregation (distributed noise) adaptive clipping is unavailable (the server sees "
                "no individual norm) and the accountant is the Skellam RDP bound: leave target_quantile and "
                "accountant unset"
            )
        if problems:
            raise ValueError("; ".join(problems))
        try:  # the accountants' arithmetic overflows far outside any useful setting: a problem, not a crash
            multiplier = self.update_multiplier
            one_round = [(self.noise_multiplier, self.sample_rate, 1)]
            one = epsilon_spent(one_round, self.delta, self.accountant, self.distributed) if self.target_epsilon else 0
        except ArithmeticError as error:
            raise ValueError(
                f"noise_multiplier {self.noise_multiplier} (clip_norm {self.clip_norm}) is outside what the privacy "
                f"arithmetic can represent ({type(error).__name__})"
            ) from None
        if not math.isfinite(multiplier) or multiplier <= 0:
            raise ValueError(f"the update's noise multiplier {multiplier} is not a positive finite number")
        if one > self.target_epsilon:
            raise ValueError(
                f"target_epsilon {self.target_epsilon} cannot afford a single round (one round spends "
                f"{one:.4g}); raise noise_multiplier or the target"
            )
        return self
