"""Secure aggregation between processes: the wire format, and the protocol run over a real exchange
folder by client threads that know only the exchange (as the deployed client flows do)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedtune.deployment.exchange import Exchange, ExchangeAborted, check_namespace, round_namespace
from fedtune.privacy.secagg import wire
from fedtune.privacy.secagg.protocol import (
    AdvertiseKeys,
    EncryptedShares,
    KeyRoster,
    MaskedInput,
    ProtocolViolation,
    SecAggAborted,
    SecAggParams,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from fedtune.privacy.secagg.remote import RemoteRound, take_part
from fedtune.privacy.secagg.simulation import RoundResult
from tests.test_secagg import _inputs

BIG = 2**520 + 12345  # a Shamir share's y is a point of GF(2^521 - 1): far past 64 bits


@pytest.mark.parametrize(
    "message",
    [
        AdvertiseKeys(3, b"\x01" * 32, b"\x02" * 32),
        KeyRoster(7, {0: (b"a" * 32, b"b" * 32), 5: (b"c" * 32, b"d" * 32)}, 35),
        EncryptedShares(2, {0: b"\x00ciphertext", 4: b"\xffmore"}),
        ShareDelivery(1, {0: b"x", 2: b"y"}, [0, 1, 2]),
        UnmaskRequest([0, 2, 3], [1]),
        UnmaskResponse(0, {2: (3, BIG)}, {1: (1, BIG - 1)}),
    ],
)
def test_messages_survive_the_wire_unchanged(message: wire.Message) -> None:
    assert wire.load(wire.dump(message), type(message)) == message


@pytest.mark.parametrize("bits", [8, 33, 62, 64])
@pytest.mark.parametrize("length", [0, 1, 7, wire.PACKING_CHUNK + 3])
def test_a_masked_vector_survives_the_wire_bit_for_bit_in_its_modulus_bits(bits: int, length: int) -> None:
    rng = np.random.default_rng(bits)
    vector = rng.integers(0, 1 << min(bits, 63), size=length, dtype=np.uint64)
    vector[: min(length, 1)] = (1 << bits) - 1  # the largest word: every bit set
    data = wire.dump(MaskedInput(4, vector, bits))
    back = wire.load_masked(data)
    assert back.sender == 4 and back.bits == bits and back.vector.dtype == np.uint64
    assert np.array_equal(back.vector, vector)
    header = f"4 {bits} {length}\n".encode()
    assert data.startswith(header) and len(data) == len(header) + -(-length * bits // 8)  # no byte wasted


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"not json", AdvertiseKeys),
        (wire.dump(UnmaskRequest([0], [])), AdvertiseKeys),  # another message type
        (b'{"type": "AdvertiseKeys", "sender": 1, "cipher_key": "%%%", "mask_key": ""}', AdvertiseKeys),
        (b'{"type": "KeyRoster", "round": 1}', KeyRoster),
        (b'{"type": "KeyRoster", "round": 1, "keys": {}, "modulus_bits": 40.7}', KeyRoster),
        (b'{"type": "AdvertiseKeys", "sender": 1e400, "cipher_key": "", "mask_key": ""}', AdvertiseKeys),
    ],
)
def test_malformed_messages_are_protocol_violations(data: bytes, kind: type[wire.Message]) -> None:
    with pytest.raises(ProtocolViolation):
        wire.load(data, kind)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"1 33 4\n" + bytes(16), "16 bytes for 4 words of 33 bits"),  # 17 expected
        (b"1 33 4\n" + bytes(18), "18 bytes for 4 words of 33 bits"),
        (b"1 65 4\n" + bytes(33), "4 words of 65 bits"),
        (b"1 33\n" + bytes(17), "expected 3"),
        (b"no header", "malformed masked input"),
    ],
)
def test_a_masked_input_that_is_not_its_declared_size_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(ProtocolViolation, match=why):
        wire.load_masked(data)


NAMESPACE = "run/round_0001"


def _run(
    root: Path, clients: list[int], inputs: dict[int, Callable[[], np.ndarray]], params: SecAggParams, length: int
) -> tuple[RoundResult | SecAggAborted, dict[int, BaseException | int]]:
    """The server in this thread for `clients`, each client of `inputs` in a thread of its own,
    the exchange a folder; stage deadlines of 3 s, the clients' own of 60 s."""
    exchange, outcome = Exchange(str(root)), {}

    def client(c: int) -> None:
        try:
            outcome[c] = take_part(exchange, NAMESPACE, c, params, 1, inputs[c], time.monotonic() + 60, 0.02)
        except BaseException as error:  # noqa: BLE001 (recorded for the test to inspect)
            outcome[c] = error

    threads = [threading.Thread(target=client, args=(c,)) for c in inputs]
    for thread in threads:
        thread.start()
    result: RoundResult | SecAggAborted
    try:
        result = RemoteRound(exchange, NAMESPACE, 0.02).run(clients, length, params, 1, stage_timeout=3)
    except SecAggAborted as error:
        result = error
    for thread in threads:
        thread.join(timeout=60)
    return result, outcome


def test_survivors_sum_exactly_when_a_client_dies_after_sharing_its_keys(tmp_path: Path) -> None:
    vectors = _inputs(4, 64, seed=5)

    def dies() -> np.ndarray:
        raise RuntimeError("killed before masking")

    inputs: dict[int, Callable[[], np.ndarray]] = {c: (lambda v=v: v) for c, v in vectors.items()}
    inputs[3] = dies
    params = SecAggParams(threshold=2)
    result, outcome = _run(tmp_path, [0, 1, 2, 3], inputs, params, 64)
    assert isinstance(result, RoundResult) and result.aggregated == [0, 1, 2]
    assert np.array_equal(result.total, (vectors[0] + vectors[1] + vectors[2]) & params.modulus_mask)
    assert result.left_out == ["client 3: missed the masked deadline of 3 s"]
    assert all(isinstance(outcome[c], int) and outcome[c] > 0 for c in (0, 1, 2))
    assert isinstance(outcome[3], RuntimeError)
    masked = wire.load_masked((tmp_path / "client_0" / NAMESPACE / "secagg" / "masked.npy").read_bytes())
    assert not np.array_equal(masked.vector, vectors[0])  # what travelled was masked


def test_an_aborting_server_stops_every_waiting_client_at_once(tmp_path: Path) -> None:
    vectors = _inputs(2, 16, seed=6)  # client 2 never shows up: the roster falls below the threshold
    start = time.monotonic()
    result, outcome = _run(tmp_path, [0, 1, 2], {c: (lambda v=v: v) for c, v in vectors.items()}, SecAggParams(3), 16)
    assert isinstance(result, SecAggAborted) and "key advertisement: 2 clients left, threshold is 3" in str(result)
    assert all(isinstance(outcome[c], ExchangeAborted) for c in (0, 1))
    assert time.monotonic() - start < 30  # well before the clients' own 60 s deadline


def test_a_masked_vector_of_the_wrong_length_drops_its_sender_not_the_round(tmp_path: Path) -> None:
    """rel-07: client 2 sends 63 coordinates instead of 64; the round goes on with clients 0 and 1."""
    vectors = _inputs(3, 64, seed=7)
    inputs: dict[int, Callable[[], np.ndarray]] = {c: (lambda v=v: v) for c, v in vectors.items()}
    inputs[2] = lambda: vectors[2][:63]
    params = SecAggParams(threshold=2)
    result, outcome = _run(tmp_path, [0, 1, 2], inputs, params, 64)
    assert isinstance(result, RoundResult) and result.aggregated == [0, 1]
    assert np.array_equal(result.total, (vectors[0] + vectors[1]) & params.modulus_mask)
    assert result.left_out == ["client 2: its masked input has shape (63,), not (64,)"]
    assert all(isinstance(outcome[c], int) for c in (0, 1))


def test_a_masked_vector_in_another_modulus_drops_its_sender_not_the_round(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """rel-07 for the packed words: client 2 declares one bit more than the round's modulus."""
    honest = wire.dump

    def lying(message: wire.Message) -> bytes:
        if isinstance(message, MaskedInput) and message.sender == 2:
            return honest(MaskedInput(2, message.vector, message.bits + 1))
        return honest(message)

    monkeypatch.setattr(wire, "dump", lying)
    vectors = _inputs(3, 64, seed=8)
    params = SecAggParams(threshold=2, modulus_bits=40)
    result, outcome = _run(tmp_path, [0, 1, 2], {c: (lambda v=v: v) for c, v in vectors.items()}, params, 64)
    assert isinstance(result, RoundResult) and result.aggregated == [0, 1]
    assert np.array_equal(result.total, (vectors[0] + vectors[1]) & params.modulus_mask)
    assert result.left_out == ["client 2: its masked input is mod 2^41, not 2^40"]
    assert all(isinstance(outcome[c], int) for c in (0, 1))


def test_exchange_keys_and_round_namespaces_cannot_leave_their_folder(tmp_path: Path) -> None:
    """rel-08: a client flow started with namespace '../server/leak' wrote its update where every
    party reads; keys with '..' or an absolute path are refused, and so is any other namespace."""
    exchange = Exchange(str(tmp_path / "exchange"))
    for key in ("client_0/../server/leak/update.safetensors", "/etc/passwd", "client_0//x", "client_0/./x"):
        with pytest.raises(ValueError, match="not a plain relative path"):
            exchange.put(key, b"update")
    assert not any(tmp_path.rglob("update*")) and not (tmp_path / "exchange" / "server").exists()
    made = round_namespace("0123456789abcdef0123456789abcdef", 3)
    assert check_namespace(made) == made
    for namespace in ("../server/leak", "../../anywhere", "run/round_0001", f"{made}/../../x"):
        with pytest.raises(ValueError, match="is not <run id>/round_NNNN-<attempt>"):
            check_namespace(namespace)
