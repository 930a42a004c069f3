"""A federated round's aggregation behind secure aggregation (simulation transport).

Each client encodes its own update (clipped, quantized, weighted by its example count) on its
side; the protocol's server object sees masked vectors and reconstructs only their sum, which is
decoded into the example-weighted mean update: FedAvg, within one quantization level per
coordinate. Only linear aggregation fits: robust filters need the individual updates that
secure aggregation exists to hide, so asking for both is refused when the config is built.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch

from fedtune.adapters import AdapterState, Spec, add, flatten, load_state, unflatten
from fedtune.secagg.protocol import ProtocolViolation, SecAggAborted, SecAggParams
from fedtune.secagg.quantize import FixedPoint
from fedtune.secagg.simulation import Encoded, run_round
from fedtune.validation import RoundAborted

LINEAR_STRATEGIES = ("fedavg",)


def parameters(cfg: Any) -> tuple[SecAggParams, FixedPoint]:
    section, k = cfg.secagg, cfg.federation.clients_per_round
    threshold = section.threshold if section.threshold is not None else max(2, k // 2 + 1)
    params = SecAggParams(threshold=threshold, modulus_bits=section.modulus_bits, neighbours=section.neighbours)
    return params, FixedPoint(clip=section.clip, level_bits=section.level_bits, modulus_bits=section.modulus_bits)


def check_secure_aggregation(cfg: Any) -> None:
    """Refuse combinations that cannot be correct or cannot work, naming the fields."""
    if cfg.federation.strategy == "dp_fedavg":
        raise ValueError(
            "secagg.enabled: dp_fedavg adds its noise on the server, which would need the un-noised sum; "
            "distributed noise added by the clients is not available yet, so choose one of the two"
        )
    if cfg.federation.strategy not in LINEAR_STRATEGIES:
        raise ValueError(
            f"secagg.enabled: federation.strategy {cfg.federation.strategy!r} needs each client's update, "
            "which secure aggregation hides; use fedavg (norm bounding belongs on the clients then)"
        )
    params, point = parameters(cfg)
    try:
        params.check(cfg.federation.clients_per_round)
        point.check(cfg.federation.clients_per_round, cfg.federation.max_client_examples)
    except ValueError as error:
        raise ValueError(f"secagg: {error}") from None


def _client_encode(path: str, weight: int, spec: Spec, point: FixedPoint, seed: int) -> np.ndarray:
    """Runs on the client's side: its own update, checked, clipped, quantized and weighted."""
    state = load_state(path)
    if sorted(state) != [key for key, _, _ in spec]:
        raise ProtocolViolation("my update does not match the global adapter's tensors")
    vector, _ = flatten(state)
    if not torch.isfinite(vector).all():
        raise ProtocolViolation("my update has NaN or Inf values")
    return point.encode(vector.numpy(), weight, np.random.default_rng(seed))


def secure_aggregate(
    cfg: Any, round_: int, global_state: AdapterState, reports: list[dict[str, Any]], dropped: list[str]
) -> tuple[AdapterState, list[str], int]:
    """New global state, clients left out with reasons, and the protocol bytes the clients sent."""
    params, point = parameters(cfg)
    _, spec = flatten(global_state)
    length = sum(int(np.prod(shape)) for _, shape, _ in spec) + 1  # + the weight coordinate
    too_many = [r for r in reports if not 0 < r["num_examples"] <= cfg.federation.max_client_examples]
    left_out = [*dropped, *(f"client {r['client']}: example count {r['num_examples']} out of range" for r in too_many)]
    inputs: dict[int, Encoded] = {
        r["client"]: partial(_client_encode, r["update_path"], r["num_examples"], spec, point, r["client"] + round_)
        for r in reports
        if r not in too_many
    }
    if len(inputs) < max(params.threshold, cfg.federation.min_fit_clients):
        raise RoundAborted(f"round {round_}: {len(inputs)} clients for secure aggregation; left out: {left_out}")
    try:
        result = run_round(inputs, length, params, round_)
    except SecAggAborted as error:
        raise RoundAborted(f"round {round_}: secure aggregation aborted ({error}); left out: {left_out}") from error
    left_out += result.left_out
    if len(result.aggregated) < cfg.federation.min_fit_clients:
        raise RoundAborted(f"round {round_}: {len(result.aggregated)} aggregated; left out: {left_out}")
    mean = unflatten(torch.from_numpy(point.decode(result.total)), spec)
    return add(global_state, mean), left_out, sum(result.bytes_up.values())
