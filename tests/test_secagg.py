"""Secure aggregation: exact sums under dropouts at every stage, refusals, mask quality."""

from __future__ import annotations

import tracemalloc
import weakref

import numpy as np
import pytest

from fedtune.privacy.secagg import primitives, shamir
from fedtune.privacy.secagg.protocol import (
    MaskedInput,
    ProtocolViolation,
    SecAggAborted,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    UnmaskRequest,
)
from fedtune.privacy.secagg.quantize import FixedPoint
from fedtune.privacy.secagg.simulation import STAGES, run_round


def run(inputs: dict[int, np.ndarray], params: SecAggParams, drop: dict[str, set[int]] | None = None):
    """One round through the simulation transport; `drop[stage]` clients go silent from then on."""
    length = next(iter(inputs.values())).shape[0]
    return run_round({c: (lambda v=v: v) for c, v in inputs.items()}, length, params, 1, drop)


def _inputs(n: int, length: int, seed: int, bits: int = 62) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.integers(0, 1 << 20, size=length, dtype=np.uint64) for c in range(n)}


@pytest.mark.parametrize("n", [5, 10, 20])
@pytest.mark.parametrize("stage", [None, *STAGES])
def test_sum_is_exact_for_the_survivors_with_dropouts_at_each_stage(n: int, stage: str | None) -> None:
    params = SecAggParams(threshold=n // 2 + 1)
    inputs = _inputs(n, 257, seed=n)
    dropped = {1, n - 1} if stage else set()
    result = run(inputs, params, {stage: dropped} if stage else None)
    total, survivors = result.total, result.aggregated
    if stage in ("advertise", "share", "masked"):
        assert set(survivors) == set(inputs) - dropped
    expected = np.zeros(257, dtype=np.uint64)
    for c in survivors:
        expected = (expected + inputs[c]) & params.modulus_mask
    assert np.array_equal(total, expected)


def test_secagg_plus_sparse_neighbourhoods_with_dropouts() -> None:
    params = SecAggParams(threshold=4, neighbours=6)
    inputs = _inputs(20, 64, seed=3)
    result = run(inputs, params, {"masked": {2, 9}, "unmask": {5}})
    assert result.aggregated == sorted(set(range(20)) - {2, 9})
    expected = sum(inputs[c] for c in result.aggregated) & params.modulus_mask
    assert np.array_equal(result.total, expected)


def test_the_server_sums_masked_inputs_as_they_arrive_holding_one_at_a_time(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Its memory is one vector whatever the number of clients (issue 17: 1,000-client rounds)."""
    sent: list[weakref.ref[np.ndarray]] = []
    most_alive = 0
    real = SecAggClient.masked_input

    def tracked(self, delivery, encoded):  # type: ignore[no-untyped-def]
        nonlocal most_alive
        most_alive = max(most_alive, sum(ref() is not None for ref in sent))  # earlier inputs still held
        message = real(self, delivery, encoded)
        sent.append(weakref.ref(message.vector))
        return message

    monkeypatch.setattr(SecAggClient, "masked_input", tracked)
    inputs = _inputs(30, 1000, seed=4)
    result = run(inputs, SecAggParams(threshold=8, neighbours=10), {"masked": {3}})
    assert len(sent) == 29 and most_alive <= 1  # a running sum, not one held vector per client
    assert np.array_equal(result.total, sum(inputs[c] for c in result.aggregated) & SecAggParams(2).modulus_mask)


def test_the_servers_memory_for_masked_inputs_is_one_vector_whatever_the_clients() -> None:
    """Measured by tracemalloc (NumPy reports its buffers to it): kept copies fail it as kept references do."""
    n, length = 40, 50_000
    params = SecAggParams(threshold=21)
    clients = {c: SecAggClient(c, params, 1) for c in range(n)}
    server = SecAggServer(params, 1, length)
    roster = server.collect_keys([c.advertise() for c in clients.values()])
    server.route_shares([c.share_keys(roster) for c in clients.values()])
    vector_bytes = 8 * length

    def arriving():  # type: ignore[no-untyped-def]  # inputs as the exchange delivers them, one at a time
        for c in range(n):
            yield MaskedInput(c, np.full(length, c, dtype=np.uint64), params.modulus_bits)

    tracemalloc.start()
    try:
        server.collect_masked(arriving())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * vector_bytes, peak / vector_bytes  # the sum, the input in hand, slack: not 40 inputs


def test_below_threshold_aborts_and_aggregates_nothing() -> None:
    params = SecAggParams(threshold=4)
    for stage in STAGES:
        with pytest.raises((SecAggAborted, ProtocolViolation)):
            run(_inputs(5, 16, seed=1), params, {stage: {0, 1, 2}})


def test_clients_refuse_contradictory_unmask_requests() -> None:
    params = SecAggParams(threshold=3)
    inputs = _inputs(5, 16, seed=2)
    clients = {c: SecAggClient(c, params, 1) for c in inputs}
    server = SecAggServer(params, 1, 16)
    roster = server.collect_keys([c.advertise() for c in clients.values()])
    deliveries = server.route_shares([c.share_keys(roster) for c in clients.values()])
    server.collect_masked([clients[c].masked_input(deliveries[c], inputs[c]) for c in clients])
    bad = [
        UnmaskRequest(alive=[0, 1, 2, 3], dropped=[3, 4]),  # 3 both alive and dropped
        UnmaskRequest(alive=[1, 2, 3, 4], dropped=[0]),  # asks client 0, listing it dropped
        UnmaskRequest(alive=[0, 1, 1, 2], dropped=[]),  # duplicates
        UnmaskRequest(alive=[0, 1, 2, 9], dropped=[]),  # 9 never shared keys
        UnmaskRequest(alive=[0, 1], dropped=[2, 3, 4]),  # below the threshold
    ]
    for request in bad:
        with pytest.raises(ProtocolViolation, match="refuses to unmask"):
            clients[0].unmask(request)


def test_masked_inputs_look_uniform_and_uncorrelated_with_the_plaintext() -> None:
    params = SecAggParams(threshold=3, modulus_bits=32)
    length = 20_000
    plain = {c: np.full(length, 7 * c, dtype=np.uint64) for c in range(4)}
    plain[0] = np.arange(length, dtype=np.uint64)  # a structured input
    clients = {c: SecAggClient(c, params, 1) for c in plain}
    server = SecAggServer(params, 1, length)
    roster = server.collect_keys([c.advertise() for c in clients.values()])
    deliveries = server.route_shares([c.share_keys(roster) for c in clients.values()])
    masked = clients[0].masked_input(deliveries[0], plain[0]).vector.astype(np.float64)
    counts = np.histogram(masked, bins=16, range=(0, 2**32))[0]
    expected = length / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 37.7  # 15 degrees of freedom, p = 0.001
    assert abs(np.corrcoef(masked, plain[0].astype(np.float64))[0, 1]) < 0.05


def test_mask_seeds_differing_only_in_word_order_give_different_masks() -> None:
    seed = bytes(range(32))
    swapped = seed[8:16] + seed[:8] + seed[16:]
    a, b = primitives.mask(seed, 1000, 62), primitives.mask(swapped, 1000, 62)
    assert not np.array_equal(a, b) and np.mean(a == b) < 0.01
    assert np.array_equal(a, primitives.mask(seed, 1000, 62))


def test_parameters_that_break_correctness_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        SecAggParams(threshold=1).check(5)
    with pytest.raises(ValueError, match="exceeds the 5 clients"):
        SecAggParams(threshold=6).check(5)
    with pytest.raises(ValueError, match="exceeds the modulus"):
        FixedPoint(clip=1.0, level_bits=16, modulus_bits=32).check(clients=100, max_weight=1000)
    FixedPoint(clip=1.0, level_bits=16, modulus_bits=62).check(clients=100, max_weight=1000)


def test_a_masked_upload_costs_at_most_1_1x_a_float32_one_at_the_default_quantization() -> None:
    """The round's modulus holds exactly its weighted sum (24 quantization bits, the default, and three
    clients of about 500 examples: 35 bits), and each masked word travels in those bits (issue 17)."""
    point = FixedPoint(clip=1.0, level_bits=24, modulus_bits=62)
    weights, length = {0: 480, 1: 510, 2: 530}, 460_800  # the default adapter's coordinates
    rng = np.random.default_rng(0)
    updates = {c: rng.normal(0, 0.01, length) for c in weights}
    params = SecAggParams(threshold=2, modulus_bits=point.bits_for(sum(weights.values())))
    assert params.modulus_bits == 35
    inputs = {c: (lambda c=c: point.encode(updates[c], weights[c], rng)) for c in weights}
    result = run_round(inputs, length + 1, params, 1)
    assert max(result.bytes_up.values()) <= 1.1 * 4 * length  # a float32 upload: 4 bytes a coordinate
    exact = sum(weights[c] * updates[c] for c in weights) / sum(weights.values())
    assert np.max(np.abs(point.decode(result.total) - exact)) <= point.step  # and the sum did not wrap


@pytest.mark.parametrize(("announced", "why"), [(41, r"outside 2\^8..2\^40"), (16, r"does not fit the round's 2\^16")])
def test_a_client_refuses_a_modulus_above_its_own_or_too_small_for_its_input(announced: int, why: str) -> None:
    server = SecAggServer(SecAggParams(threshold=2, modulus_bits=announced), 1, 4)
    clients = [SecAggClient(c, SecAggParams(threshold=2, modulus_bits=40), 1) for c in range(3)]
    roster = server.collect_keys([c.advertise() for c in clients])
    with pytest.raises(ProtocolViolation, match=why):
        deliveries = server.route_shares([c.share_keys(roster) for c in clients])
        clients[0].masked_input(deliveries[0], np.array([1, 2, 3, 1 << 16], dtype=np.uint64))


def test_shamir_threshold_recovers_and_fewer_shares_do_not() -> None:
    secret = bytes(range(1, 33))
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    assert shamir.combine([shares[1], shares[4], shares[5]], 32) == secret
    with pytest.raises(ValueError, match="do not reconstruct"):
        shamir.combine([shares[2], shares[3]], 32)


def test_quantized_weighted_mean_is_within_one_level() -> None:
    point = FixedPoint(clip=0.5, level_bits=16, modulus_bits=62)
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 0.1, 1000) for _ in range(6)]
    weights = [10, 200, 35, 1, 77, 120]
    total = sum(point.encode(u, w, rng) for u, w in zip(updates, weights, strict=True))
    exact = sum(w * np.clip(u, -0.5, 0.5) for u, w in zip(updates, weights, strict=True)) / sum(weights)
    assert np.max(np.abs(point.decode(total) - exact)) <= point.step


def test_robust_strategies_and_overflowing_parameters_are_refused_with_secure_aggregation() -> None:
    from fedtune.config.schema import ConfigError, build_config

    with pytest.raises(ConfigError, match="secagg.enabled: federation.strategy 'median' needs each client's update"):
        build_config({"secagg": {"enabled": True}, "federation": {"strategy": "median"}})
    with pytest.raises(ConfigError, match="secagg: .*exceeds the modulus"):
        build_config({"secagg": {"enabled": True, "modulus_bits": 32, "level_bits": 24}})
    with pytest.raises(ConfigError, match="threshold 4 exceeds the 3 clients"):
        build_config({"secagg": {"enabled": True, "threshold": 4}})
    with pytest.raises(ConfigError, match="secagg.threshold: 3 of 3 leaves no dropout tolerance"):
        build_config({"secagg": {"enabled": True, "threshold": 3}})
    five = {"clients_per_round": 5}
    with pytest.raises(ConfigError, match="secagg.threshold: 3 of 3 leaves no dropout tolerance"):  # SecAgg+ ring
        build_config({"secagg": {"enabled": True, "threshold": 3, "neighbours": 2}, "federation": five})
    build_config({"secagg": {"enabled": True, "threshold": 2}})
    build_config({"secagg": {"enabled": True}})


def test_a_reply_past_the_stage_deadline_counts_as_a_dropout() -> None:
    import time

    params = SecAggParams(threshold=3)
    inputs = _inputs(5, 64, seed=1)

    def slow(c: int):  # type: ignore[no-untyped-def]
        def encode():  # type: ignore[no-untyped-def]
            if c == 2:
                time.sleep(0.5)
            return inputs[c]

        return encode

    result = run_round({c: slow(c) for c in inputs}, 64, params, round_=1, stage_timeout=0.25)
    assert result.aggregated == [0, 1, 3, 4]
    assert any("client 2: missed the masked deadline" in reason for reason in result.left_out)
    expected = sum(inputs[c] for c in (0, 1, 3, 4)) & params.modulus_mask
    assert np.array_equal(result.total, expected)
