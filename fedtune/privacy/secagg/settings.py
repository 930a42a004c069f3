"""Secure aggregation's parameters from the config, and the configs it refuses.

Light on purpose (numpy, no torch): `fedtune check` runs these rules on every config that turns
secure aggregation on. The round itself is `fedtune.round.secure_round`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from fedtune.config.compat import Problem
from fedtune.core.catalog import STRATEGY_OPTIONS
from fedtune.privacy.secagg.protocol import SecAggParams
from fedtune.privacy.secagg.quantize import FixedPoint
from fedtune.privacy.secagg.skellam import SkellamEncoder
from fedtune.strategies.options import options_for

if TYPE_CHECKING:
    from fedtune.privacy.dp_options import DPFedAvgOptions

LARGEST_ADAPTER = 1 << 34  # coordinates assumed when the config is checked, before the adapter exists


def parameters(cfg: Any) -> tuple[SecAggParams, FixedPoint]:
    """The protocol's parameters (threshold: secagg.threshold, else a majority of the round, at least 2)
    and the fixed-point encoding of FedAvg's updates."""
    section, k = cfg.secagg, cfg.federation.clients_per_round
    threshold = section.threshold if section.threshold is not None else max(2, k // 2 + 1)
    params = SecAggParams(threshold=threshold, modulus_bits=section.modulus_bits, neighbours=section.neighbours)
    return params, FixedPoint(clip=section.clip, level_bits=section.level_bits, modulus_bits=section.modulus_bits)


def skellam_encoder(cfg: Any, options: DPFedAvgOptions, dim: int) -> SkellamEncoder:
    """Noise shares calibrated for the fewest clients a round can aggregate (see skellam.py)."""
    params, _ = parameters(cfg)
    fewest = max(params.threshold, cfg.federation.min_fit_clients)
    return SkellamEncoder(options.clip_norm, options.noise_multiplier, fewest, params.modulus_bits, dim)


def problems(cfg: Any) -> Iterator[Problem]:
    """Combinations that cannot be correct or cannot work, each at its field path. What depends on the
    strategy's options is checked only when they are valid (the strategy's own rule reports them)."""
    name = cfg.federation.strategy
    options = STRATEGY_OPTIONS.get(name)  # its traits need no valid options
    if options.extras:
        yield Problem(
            "secagg.enabled",
            f"federation.strategy {name!r} sends {', '.join(options.extras)} beside each update, which secure "
            "aggregation does not mask yet",
        )
        return
    if not options.sum_only:
        yield Problem(
            "secagg.enabled",
            f"federation.strategy {name!r} needs each client's update, which secure aggregation hides; use "
            "fedavg, fedprox, a server optimizer (fedavgm, fedadagrad, fedyogi, fedadam) or dp_fedavg (norm "
            "bounding belongs on the clients then)",
        )
        return
    try:
        valid = options_for(cfg)
    except ValueError:
        return
    params, point = parameters(cfg)
    k = cfg.federation.clients_per_round
    peers = k if params.neighbours is None else min(k, params.neighbours + 1)  # who share each client's masks
    if cfg.secagg.threshold == peers and peers > 2:
        yield Problem(
            "secagg.threshold",
            f"{peers} of {peers} leaves no dropout tolerance: one client that drops out after sharing its keys "
            f"aborts the round; set at most {peers - 1} (the default is a majority)",
        )
    try:
        params.check(k)
        if valid.adds_noise:
            skellam_encoder(cfg, cast("DPFedAvgOptions", valid), LARGEST_ADAPTER).check(k)
        else:
            point.check(k, cfg.federation.max_client_examples)
    except ValueError as error:
        yield Problem("secagg", str(error))
    except ArithmeticError as error:  # a clip norm or noise far outside any useful setting
        yield Problem("secagg", f"the encoding's arithmetic overflows with these settings ({type(error).__name__})")
