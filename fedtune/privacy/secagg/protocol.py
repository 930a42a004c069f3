"""The secure aggregation protocol: client and server objects exchanging explicit messages.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
Fig. 4 (semi-honest variant), with the sparse neighbourhoods of SecAgg+ (Bell et al. 2020) as an
option. Four stages:

0. AdvertiseKeys: each client sends two X25519 public keys (one to encrypt shares, one for masks).
1. ShareKeys: each client Shamir-shares (t-of-n) its mask private key and a fresh 32-byte self-mask
   seed among its neighbours, each share encrypted with AES-GCM under a key only the receiver
   shares with it; the server only routes ciphertexts.
2. MaskedInput: each client sends x + PRG(b_u) + sum_v +-PRG(s_uv) mod 2^bits, where s_uv comes from
   an X25519 agreement with neighbour v; pairwise masks cancel in the sum. `bits` is the round's: the
   server announces in the roster the fewest bits that hold the sum, and each word travels in that
   many bits (`wire`), not in 64.
3. Unmasking: for each client still alive the others reveal shares of its self-mask seed; for
   each client that dropped after sharing, shares of its mask key, so the server can remove the
   pairwise masks it left behind. A client never reveals both for the same peer and refuses any
   request that contradicts what it saw.

The server object only ever holds masked inputs, ciphertexts it cannot open, and the secrets it
is entitled to reconstruct; below `threshold` survivors at any stage it aborts. The simulation
passes messages in memory; a deployment carries the same messages between processes, and each
server stage takes whatever arrived before its deadline.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedtune.privacy.secagg import primitives, shamir


class SecAggAborted(RuntimeError):
    """Too few clients survived a stage; nothing was aggregated."""


class ProtocolViolation(ValueError):
    """A message contradicts the protocol; the receiving party refuses to go on."""


@dataclass(frozen=True)
class SecAggParams:
    threshold: int
    modulus_bits: int = 62
    neighbours: int | None = None  # SecAgg+: size k of each neighbourhood; None = everyone

    def check(self, clients: int) -> None:
        problems = []
        if self.threshold < 2:
            problems.append(f"threshold must be at least 2, got {self.threshold}")
        if self.threshold > clients:
            problems.append(f"threshold {self.threshold} exceeds the {clients} clients")
        if not 8 <= self.modulus_bits <= 62:
            problems.append(f"modulus_bits must be in 8..62, got {self.modulus_bits}")
        if self.neighbours is not None and (
            self.neighbours % 2 or not self.threshold <= self.neighbours + 1 <= clients
        ):
            problems.append(f"neighbours {self.neighbours} must be even with threshold - 1 <= k < clients")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def modulus_mask(self) -> np.uint64:
        return np.uint64((1 << self.modulus_bits) - 1)


def neighbourhood(client: int, clients: list[int], params: SecAggParams, round_: int) -> list[int]:
    """The peers `client` shares and masks with (itself included): everyone, or for SecAgg+ a
    ring of k over a permutation that every party derives from the round number."""
    if params.neighbours is None:
        return sorted(clients)
    order = sorted(clients)
    random.Random(f"secagg-graph:{round_}").shuffle(order)
    here = order.index(client)
    half = params.neighbours // 2
    picked = {order[(here + step) % len(order)] for step in range(-half, params.neighbours - half + 1)}
    return sorted(picked)


@dataclass(frozen=True)
class AdvertiseKeys:
    sender: int
    cipher_key: bytes
    mask_key: bytes


@dataclass(frozen=True)
class KeyRoster:
    round: int
    keys: dict[int, tuple[bytes, bytes]]  # client -> (cipher public key, mask public key)
    modulus_bits: int  # the round's: masked arithmetic is mod 2^modulus_bits


@dataclass(frozen=True)
class EncryptedShares:
    sender: int
    ciphertexts: dict[int, bytes]  # receiver -> AES-GCM(share of mask key, share of self-mask seed)


@dataclass(frozen=True)
class ShareDelivery:
    receiver: int
    ciphertexts: dict[int, bytes]  # sender -> ciphertext addressed to `receiver`
    sharers: list[int]  # every client whose shares went out (U2)


@dataclass(frozen=True)
class MaskedInput:
    sender: int
    vector: np.ndarray  # uint64 words below 2^bits
    bits: int


@dataclass(frozen=True)
class UnmaskRequest:
    alive: list[int]  # sent a masked input (U3)
    dropped: list[int]  # shared keys but sent no masked input (U2 minus U3)


@dataclass(frozen=True)
class UnmaskResponse:
    sender: int
    seed_shares: dict[int, shamir.Share]  # alive peer -> share of its self-mask seed
    key_shares: dict[int, shamir.Share]  # dropped peer -> share of its mask private key


def _associated(round_: int, sender: int, receiver: int) -> bytes:
    return f"fedtune-secagg|{round_}|{sender}|{receiver}".encode()


def _share(pair: list[int]) -> shamir.Share:
    """A share as it came out of JSON (a two-item list) back to an (x, y) tuple."""
    x, y = pair
    return (int(x), int(y))


def _point(client: int) -> int:
    return client + 1  # Shamir points must be non-zero


@dataclass
class SecAggClient:
    client: int
    params: SecAggParams
    round: int
    _cipher: X25519PrivateKey = field(default_factory=primitives.new_private_key, repr=False)
    _mask: X25519PrivateKey = field(default_factory=primitives.new_private_key, repr=False)
    _seed: bytes = field(default_factory=lambda: os.urandom(32), repr=False)

    def advertise(self) -> AdvertiseKeys:
        return AdvertiseKeys(self.client, primitives.public_bytes(self._cipher), primitives.public_bytes(self._mask))

    def share_keys(self, roster: KeyRoster) -> EncryptedShares:
        if roster.round != self.round or self.client not in roster.keys:
            raise ProtocolViolation(f"client {self.client}: roster for another round or without me")
        if len(roster.keys) < self.params.threshold:
            raise ProtocolViolation(f"client {self.client}: roster of {len(roster.keys)} below the threshold")
        if not 8 <= roster.modulus_bits <= self.params.modulus_bits:
            raise ProtocolViolation(
                f"client {self.client}: a modulus of 2^{roster.modulus_bits}, outside 2^8..2^{self.params.modulus_bits}"
            )
        self.params = replace(self.params, modulus_bits=roster.modulus_bits)
        self._roster = roster.keys
        self._peers = neighbourhood(self.client, list(roster.keys), self.params, self.round)
        points = [_point(v) for v in self._peers]
        key_shares = shamir.split(primitives.private_bytes(self._mask), self.params.threshold, points)
        seed_shares = shamir.split(self._seed, self.params.threshold, points)
        self._held: dict[int, tuple[shamir.Share, shamir.Share]] = {
            self.client: (key_shares[_point(self.client)], seed_shares[_point(self.client)])
        }
        ciphertexts = {}
        for v in self._peers:
            if v == self.client:
                continue
            plain = json.dumps(
                {"from": self.client, "to": v, "key": key_shares[_point(v)], "seed": seed_shares[_point(v)]}
            )
            key = primitives.agree(self._cipher, roster.keys[v][0], b"shares")
            ciphertexts[v] = primitives.encrypt(key, plain.encode(), _associated(self.round, self.client, v))
        return EncryptedShares(self.client, ciphertexts)

    def masked_input(self, delivery: ShareDelivery, encoded: np.ndarray) -> MaskedInput:
        sharers = set(delivery.sharers)
        if delivery.receiver != self.client or self.client not in sharers or len(sharers) < self.params.threshold:
            raise ProtocolViolation(f"client {self.client}: inconsistent share delivery")
        for sender, ciphertext in delivery.ciphertexts.items():
            if sender not in self._peers or sender not in sharers:
                raise ProtocolViolation(f"client {self.client}: shares from {sender}, who is not a sharing peer")
            key = primitives.agree(self._cipher, self._roster[sender][0], b"shares")
            plain = json.loads(primitives.decrypt(key, ciphertext, _associated(self.round, sender, self.client)))
            if plain["from"] != sender or plain["to"] != self.client:
                raise ProtocolViolation(f"client {self.client}: share from {sender} is addressed elsewhere")
            self._held[sender] = (_share(plain["key"]), _share(plain["seed"]))
        self._sharers = sharers
        bits = self.params.modulus_bits
        if encoded.size and int(encoded.max()) >> bits:  # the sum would wrap around: a wrong aggregate
            raise ProtocolViolation(f"client {self.client}: its input does not fit the round's 2^{bits} modulus")
        length = encoded.shape[0]
        total = encoded.astype(np.uint64)  # a copy; sums wrap mod 2^64, reduced mod 2^bits once at the end
        total += primitives.mask(self._seed, length, bits)
        for v in self._peers:
            if v == self.client or v not in sharers:
                continue
            pair = primitives.mask(primitives.agree(self._mask, self._roster[v][1], b"mask"), length, bits)
            if self.client < v:
                total += pair
            else:
                total -= pair
        total &= self.params.modulus_mask
        return MaskedInput(self.client, total, bits)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        alive, dropped = request.alive, request.dropped
        problems = []
        if len(set(alive)) != len(alive) or len(set(dropped)) != len(dropped):
            problems.append("duplicate ids")
        if set(alive) & set(dropped):
            problems.append(f"peers listed both alive and dropped: {sorted(set(alive) & set(dropped))}")
        if self.client not in alive:
            problems.append("I am listed as dropped or missing")
        if not set(alive) | set(dropped) <= self._sharers:
            problems.append("ids that never shared keys")
        if len(alive) < self.params.threshold:
            problems.append(f"only {len(alive)} alive, below the threshold {self.params.threshold}")
        if problems:
            raise ProtocolViolation(f"client {self.client} refuses to unmask: " + "; ".join(problems))
        seed_shares = {v: self._held[v][1] for v in alive if v in self._held}
        key_shares = {v: self._held[v][0] for v in dropped if v in self._held}
        return UnmaskResponse(self.client, seed_shares, key_shares)


@dataclass
class SecAggServer:
    params: SecAggParams
    round: int
    length: int

    def _enough(self, stage: str, count: int) -> None:
        if count < self.params.threshold:
            raise SecAggAborted(f"{stage}: {count} clients left, threshold is {self.params.threshold}")

    def collect_keys(self, messages: Iterable[AdvertiseKeys]) -> KeyRoster:
        keys: dict[int, tuple[bytes, bytes]] = {}
        for message in messages:
            if message.sender in keys:
                raise ProtocolViolation(f"client {message.sender} advertised twice")
            keys[message.sender] = (message.cipher_key, message.mask_key)
        self._enough("key advertisement", len(keys))
        self._roster = keys
        return KeyRoster(self.round, dict(keys), self.params.modulus_bits)

    def route_shares(self, messages: list[EncryptedShares]) -> dict[int, ShareDelivery]:
        sharers = sorted({m.sender for m in messages})
        self._enough("share exchange", len(sharers))
        inbox: dict[int, dict[int, bytes]] = {v: {} for v in sharers}
        for message in messages:
            for receiver, ciphertext in message.ciphertexts.items():
                if receiver in inbox:
                    inbox[receiver][message.sender] = ciphertext
        self._sharers = sharers
        return {v: ShareDelivery(v, inbox[v], sharers) for v in sharers}

    def collect_masked(self, messages: Iterable[MaskedInput]) -> UnmaskRequest:
        """Adds each masked input into one running sum as it arrives, so the server holds one vector
        of `length` words whatever the number of clients (pass a generator to keep it that way)."""
        total = np.zeros(self.length, dtype=np.uint64)  # wraps mod 2^64, reduced mod 2^bits in unmask
        senders: set[int] = set()
        for message in messages:
            if message.sender not in self._sharers or message.sender in senders:
                raise ProtocolViolation(f"unexpected or repeated masked input from {message.sender}")
            if message.vector.shape != (self.length,) or message.bits != self.params.modulus_bits:
                raise ProtocolViolation(f"masked input of client {message.sender} has the wrong length or modulus")
            senders.add(message.sender)
            total += message.vector
        self._enough("masked input", len(senders))
        self._masked_sum = total  # only once the whole stage is accepted
        alive = sorted(senders)
        return UnmaskRequest(alive, sorted(set(self._sharers) - set(alive)))

    def unmask(self, request: UnmaskRequest, responses: list[UnmaskResponse]) -> np.ndarray:
        """The sum of the alive clients' inputs mod 2^bits, with every mask removed."""
        self._enough("unmasking", len(responses))
        bits = self.params.modulus_bits
        total = self._masked_sum.copy()  # unmasking that aborts part-way leaves the stage's sum intact
        for u in request.alive:
            seed = self._reconstruct(u, [r.seed_shares[u] for r in responses if u in r.seed_shares], 32)
            total -= primitives.mask(seed, self.length, bits)
        for v in request.dropped:
            key = self._reconstruct(v, [r.key_shares[v] for r in responses if v in r.key_shares], 32)
            for u in neighbourhood(v, list(self._roster), self.params, self.round):
                if u in request.alive:
                    pair = primitives.mask(primitives.agree(key, self._roster[u][1], b"mask"), self.length, bits)
                    if u < v:  # u added +pair when u < v, -pair otherwise: take it back out
                        total -= pair
                    else:
                        total += pair
        total &= self.params.modulus_mask
        return total

    def _reconstruct(self, owner: int, shares: list[shamir.Share], length: int) -> bytes:
        if len(shares) < self.params.threshold:
            raise SecAggAborted(f"only {len(shares)} shares for client {owner}, threshold is {self.params.threshold}")
        return shamir.combine(shares[: self.params.threshold], length)
