"""What secure aggregation promises, each checked where it can break (issue 14, rel-09).

Exact sums survive every broken variant of the protocol (no pairwise masks, no self-masks, a
client revealing both shares of a peer, a 32-bit seed, a non-cryptographic generator, pairwise
keys anyone can compute), so these tests check the masks themselves: the generator against a
published AES-256 vector, each masked input against its definition (Bonawitz et al. 2017,
section 4: y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv), s_uv from key agreement), and what the
server holds after unmasking (uniform where it must learn nothing). tests/test_secagg_mutations.py
applies each of those breaks and asserts that this file fails.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedtune.privacy.secagg import primitives
from fedtune.privacy.secagg.protocol import SecAggClient, SecAggParams, SecAggServer, neighbourhood

CHI2_15_DOF_999 = 37.70  # chi-square quantile, 15 degrees of freedom, p = 0.999 (any statistics table)


def _uniform(words: np.ndarray, bits: int) -> bool:
    counts = np.histogram(words.astype(np.float64), bins=16, range=(0, 2**bits))[0]
    expected = len(words) / 16
    return float(((counts - expected) ** 2 / expected).sum()) < CHI2_15_DOF_999


def _round(params: SecAggParams, plain: dict[int, np.ndarray]):  # type: ignore[no-untyped-def]
    clients = {c: SecAggClient(c, params, 1) for c in plain}
    server = SecAggServer(params, 1, next(iter(plain.values())).shape[0])
    roster = server.collect_keys([c.advertise() for c in clients.values()])
    deliveries = server.route_shares([c.share_keys(roster) for c in clients.values()])
    return clients, server, roster, deliveries


def test_the_mask_generator_is_aes_256_ctr_of_the_whole_seed() -> None:
    # FIPS-197, appendix C.3: AES-256 of 00112233...ff under the key 000102...1f
    key = bytes(range(32))
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    assert ecb.update(bytes.fromhex("00112233445566778899aabbccddeeff")).hex() == "8ea2b7ca516745bfeafc49904b496089"
    counters = b"".join(i.to_bytes(16, "big") for i in range(4))  # CTR blocks from a zero nonce
    keystream = np.frombuffer(Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(counters), "<u8")
    assert np.array_equal(primitives.mask(key, 8, 64), keystream)
    other = bytes(31) + b"\x01"  # differs from the zero seed only in its last byte
    assert not np.array_equal(primitives.mask(bytes(32), 8, 64), primitives.mask(other, 8, 64))


def test_a_masked_input_is_its_definition_with_keys_from_key_agreement() -> None:
    params = SecAggParams(threshold=3, modulus_bits=32)
    plain = {c: np.arange(64, dtype=np.uint64) * (c + 1) for c in range(4)}
    clients, _, roster, deliveries = _round(params, plain)
    masked = clients[0].masked_input(deliveries[0], plain[0]).vector
    expected = plain[0] + primitives.mask(clients[0]._seed, 64, 32)
    keys = [primitives.agree(clients[0]._mask, roster.keys[v][1], b"mask") for v in (1, 2, 3)]
    for key in keys:
        expected = expected + primitives.mask(key, 64, 32)  # client 0 < v: added
    assert np.array_equal(masked, expected & params.modulus_mask)
    assert len(set(keys)) == 3 and keys[0] == primitives.agree(clients[1]._mask, roster.keys[0][1], b"mask")


def test_alive_inputs_stay_hidden_after_their_self_masks_are_removed() -> None:
    params = SecAggParams(threshold=3, modulus_bits=32)
    length = 20_000
    plain = {c: np.full(length, 7 * c, dtype=np.uint64) for c in range(4)}
    plain[0] = np.arange(length, dtype=np.uint64)
    clients, server, _, deliveries = _round(params, plain)
    masked = {c: clients[c].masked_input(deliveries[c], plain[c]) for c in (0, 1, 2)}  # 3 drops out
    request = server.collect_masked(list(masked.values()))
    responses = [clients[c].unmask(request) for c in request.alive]
    both = {
        u
        for u in (0, 1, 2, 3)
        if sum(u in r.key_shares for r in responses) and sum(u in r.seed_shares for r in responses)
    }
    assert both == set(), f"the server got both kinds of shares of {both}"
    seed = server._reconstruct(0, [r.seed_shares[0] for r in responses if 0 in r.seed_shares], 32)
    residual = (masked[0].vector - primitives.mask(seed, length, 32)) & params.modulus_mask
    assert _uniform(residual, 32) and not np.array_equal(residual, plain[0])


def test_a_late_input_of_a_dropped_client_stays_hidden() -> None:
    """Client 3's input arrives after the server declared it dropped and stripped its pairwise
    masks with its reconstructed key: the self-mask must still hide x_3."""
    params = SecAggParams(threshold=3, modulus_bits=32)
    length = 20_000
    plain = {c: np.arange(length, dtype=np.uint64) * (c + 1) for c in range(4)}
    clients, server, roster, deliveries = _round(params, plain)
    late = clients[3].masked_input(deliveries[3], plain[3]).vector
    request = server.collect_masked([clients[c].masked_input(deliveries[c], plain[c]) for c in (0, 1, 2)])
    responses = [clients[c].unmask(request) for c in request.alive]
    key = server._reconstruct(3, [r.key_shares[3] for r in responses if 3 in r.key_shares], 32)
    stripped = late.copy()
    for u in neighbourhood(3, list(roster.keys), params, 1):
        if u != 3:
            pair = primitives.mask(primitives.agree(key, roster.keys[u][1], b"mask"), length, 32)
            stripped = stripped - pair if u > 3 else stripped + pair
    stripped &= params.modulus_mask
    assert _uniform(stripped, 32) and not np.array_equal(stripped, plain[3] & params.modulus_mask)
