"""A federated round's aggregation behind secure aggregation.

Each client encodes its own update on its side; the protocol's server object sees masked
vectors and reconstructs only their sum. The protocol runs in this process (simulation) or
between the parties' processes over the deployment's exchange (`fedtune.privacy.secagg.remote`). Two
encodings, chosen by the strategy:

- fedavg: clipped per coordinate, quantized, weighted by the example count (the weight rides
  inside the masked vector), decoded into the example-weighted mean: FedAvg within one
  quantization level per coordinate.
- dp_fedavg: clipped to L2 norm C, scaled to integers, plus each client's share of Skellam noise
  (`fedtune.privacy.secagg.skellam`), decoded over the fixed denominator: DP-FedAvg where the server never
  sees an un-noised sum.

Only strategies that need nothing but the mean update fit (FedAvg and its server optimizers,
which step with the unmasked mean): robust filters need the individual updates that secure
aggregation exists to hide, so asking for both is refused when the config is built.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from fedtune.core.client_secret import private_seed
from fedtune.model.adapters import AdapterState, Spec, add, flatten, load_state, unflatten
from fedtune.privacy.dp_fedavg import DPFedAvg
from fedtune.privacy.secagg.protocol import ProtocolViolation, SecAggAborted
from fedtune.privacy.secagg.quantize import FixedPoint
from fedtune.privacy.secagg.remote import RemoteRound
from fedtune.privacy.secagg.settings import parameters, skellam_encoder
from fedtune.privacy.secagg.simulation import Encoded, run_round
from fedtune.privacy.secagg.skellam import SkellamEncoder
from fedtune.round.envelope import RoundAborted
from fedtune.strategies.base import ServerState
from fedtune.strategies.fedavg import FedAvg
from fedtune.strategies.options import build_strategy


def _client_rng(secret_dir: str | Path, round_: int) -> np.random.Generator:
    """The client's generator for rounding and noise, from a secret in its private folder."""
    return np.random.default_rng(private_seed(secret_dir, round_, "secagg"))


def _client_vector(path: str | Path, spec: Spec) -> np.ndarray:
    """Runs on the client's side: its own update, checked against the global adapter's tensors."""
    state = load_state(path)
    if sorted(state) != [key for key, _, _ in spec]:
        raise ProtocolViolation("my update does not match the global adapter's tensors")
    vector, _ = flatten(state)
    if not torch.isfinite(vector).all():
        raise ProtocolViolation("my update has NaN or Inf values")
    return vector.numpy()


def _weighted_encode(
    path: str | Path, weight: int, spec: Spec, point: FixedPoint, secret: np.random.Generator
) -> np.ndarray:
    return point.encode(_client_vector(path, spec), weight, secret)


def _noised_encode(path: str | Path, spec: Spec, encoder: SkellamEncoder, secret: np.random.Generator) -> np.ndarray:
    return encoder.encode(_client_vector(path, spec), secret)


def _dimension(spec: Spec) -> int:
    return sum(int(np.prod(shape)) for _, shape, _ in spec)


def vector_length(cfg: Any, spec: Spec) -> int:
    """Coordinates of every client's encoded vector: the adapter's, plus the weight for FedAvg."""
    return _dimension(spec) + (0 if isinstance(build_strategy(cfg), DPFedAvg) else 1)


def client_input(
    cfg: Any, spec: Spec, update_path: str | Path, num_examples: int, round_: int, secret_dir: str | Path
) -> Encoded:
    """The client's encoding of its own update, to be run on its side (`secret_dir`: its private folder)."""
    strategy = build_strategy(cfg)
    secret = partial(_client_rng, secret_dir, round_)
    if isinstance(strategy, DPFedAvg):
        encoder = skellam_encoder(cfg, strategy.options, _dimension(spec))
        return lambda: _noised_encode(update_path, spec, encoder, secret())
    _, point = parameters(cfg)
    return lambda: _weighted_encode(update_path, num_examples, spec, point, secret())


def secure_aggregate(
    cfg: Any,
    round_: int,
    global_state: AdapterState,
    server_state: ServerState,
    reports: list[dict[str, Any]],
    dropped: list[str],
    remote: RemoteRound | None = None,
) -> tuple[AdapterState, ServerState, list[str], int]:
    """New global and server state, clients left out with reasons, and the protocol bytes sent.

    Without `remote` the protocol runs in this process, each client encoding the update file of
    its report; with it, the clients run their side in their own processes (a deployment)."""
    params, point = parameters(cfg)
    strategy = build_strategy(cfg)
    _, spec = flatten(global_state)
    too_many = [r for r in reports if not 0 < r["num_examples"] <= cfg.federation.max_client_examples]
    left_out = [*dropped, *(f"client {r['client']}: example count {r['num_examples']} out of range" for r in too_many)]
    accepted = [r for r in reports if r not in too_many]
    if len(accepted) < max(params.threshold, cfg.federation.min_fit_clients):
        raise RoundAborted(f"round {round_}: {len(accepted)} clients for secure aggregation; left out: {left_out}")
    if not isinstance(strategy, DPFedAvg):  # the round's modulus: the fewest bits its weighted sum needs
        params = replace(params, modulus_bits=point.bits_for(sum(r["num_examples"] for r in accepted)))
    length, stage_timeout = vector_length(cfg, spec), cfg.secagg.stage_timeout_s
    try:
        if remote is None:
            inputs = {
                r["client"]: client_input(
                    cfg, spec, r["update_path"], r["num_examples"], round_, Path(r["update_path"]).parent
                )
                for r in accepted
            }
            result = run_round(inputs, length, params, round_, stage_timeout=stage_timeout)
        else:
            result = remote.run(sorted(r["client"] for r in accepted), length, params, round_, stage_timeout)
    except SecAggAborted as error:
        raise RoundAborted(f"round {round_}: secure aggregation aborted ({error}); left out: {left_out}") from error
    left_out += result.left_out
    if len(result.aggregated) < cfg.federation.min_fit_clients:
        raise RoundAborted(f"round {round_}: {len(result.aggregated)} aggregated; left out: {left_out}")
    if isinstance(strategy, DPFedAvg):
        encoder = skellam_encoder(cfg, strategy.options, _dimension(spec))
        mean = encoder.decode(result.total, strategy.options.expected_clients)
        new_global = add(global_state, unflatten(torch.from_numpy(mean), spec))
        server_state = strategy.released(server_state, len(result.aggregated))
    else:  # FedAvg or a server optimizer: its step with the mean update, the only thing unmasked
        mean_update = unflatten(torch.from_numpy(point.decode(result.total)), spec)
        new_global, server_state = cast(FedAvg, strategy).apply(global_state, mean_update, server_state)
    return new_global, server_state, left_out, sum(result.bytes_up.values())
