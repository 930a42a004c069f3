"""The protocol's messages as bytes, for a deployment that carries them between processes.

JSON for the small messages (public keys and ciphertexts in base64; Shamir shares as decimal
integers, since a point of GF(2^521 - 1) overflows JSON numbers in most readers). The masked
vector is the largest message by far: each word goes in the round's modulus bits, back to back,
after a header line `sender bits count`, so that at the default 24 quantization bits it costs
about what a float32 upload does, not the 2x of 64-bit words. Every decode checks the message's
shape and raises ProtocolViolation on anything else, so a malformed message drops its sender
instead of crashing the receiver.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np

from fedtune.privacy.secagg.protocol import (
    AdvertiseKeys,
    EncryptedShares,
    KeyRoster,
    MaskedInput,
    ProtocolViolation,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from fedtune.privacy.secagg.shamir import Share

# words per packing step: a multiple of 8, so that every step but the last fills whole bytes
PACKING_CHUNK = 1 << 17

Message = AdvertiseKeys | KeyRoster | EncryptedShares | ShareDelivery | MaskedInput | UnmaskRequest | UnmaskResponse


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    return base64.b64decode(text, validate=True)


def _blobs(items: dict[int, bytes]) -> dict[str, str]:
    return {str(k): _b64(v) for k, v in items.items()}


def _unblobs(items: Any) -> dict[int, bytes]:
    return {int(k): _unb64(v) for k, v in items.items()}


def _shares(items: dict[int, Share]) -> dict[str, list[str]]:
    return {str(k): [str(x), str(y)] for k, (x, y) in items.items()}


def _unshares(items: Any) -> dict[int, Share]:
    return {int(k): (int(x), int(y)) for k, (x, y) in items.items()}


def packed_size(count: int, bits: int) -> int:
    """Bytes of `count` words of `bits` bits each, back to back."""
    return -(-count * bits // 8)


def pack_words(words: np.ndarray, bits: int) -> bytes:
    """The low `bits` bits of each uint64 word, back to back (little-endian bit order).

    NumPy has no n-bit integer type and `cryptography` no bit packing, hence bit planes through
    `np.unpackbits`/`np.packbits`, a chunk at a time to bound memory (64 bytes per word in flight)."""
    parts = []
    for start in range(0, len(words), PACKING_CHUNK):
        chunk = np.ascontiguousarray(words[start : start + PACKING_CHUNK], dtype="<u8")
        planes = np.unpackbits(chunk.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, :bits]
        parts.append(np.packbits(planes, bitorder="little").tobytes())
    return b"".join(parts)


def unpack_words(data: bytes, bits: int, count: int) -> np.ndarray:
    """`pack_words`' inverse: `count` uint64 words. Raises ValueError when `data` is not their size."""
    if len(data) != packed_size(count, bits):
        raise ValueError(f"{len(data)} bytes for {count} words of {bits} bits")
    raw = np.frombuffer(data, dtype=np.uint8)
    words = np.empty(count, dtype=np.uint64)
    for start in range(0, count, PACKING_CHUNK):
        n = min(PACKING_CHUNK, count - start)
        first = start * bits // 8  # byte-aligned: `start` is a multiple of 8
        planes = np.unpackbits(raw[first : first + packed_size(n, bits)], bitorder="little", count=n * bits)
        full = np.zeros((n, 64), dtype=np.uint8)
        full[:, :bits] = planes.reshape(n, bits)
        words[start : start + n] = np.packbits(full, axis=1, bitorder="little").view("<u8").reshape(n)
    return words


def dump(message: Message) -> bytes:
    if isinstance(message, MaskedInput):
        header = f"{message.sender} {message.bits} {message.vector.shape[0]}\n".encode()
        return header + pack_words(message.vector, message.bits)
    body: dict[str, Any]
    if isinstance(message, AdvertiseKeys):
        body = {"sender": message.sender, "cipher_key": _b64(message.cipher_key), "mask_key": _b64(message.mask_key)}
    elif isinstance(message, KeyRoster):
        keys = {str(c): [_b64(a), _b64(b)] for c, (a, b) in message.keys.items()}
        body = {"round": message.round, "keys": keys, "modulus_bits": message.modulus_bits}
    elif isinstance(message, EncryptedShares):
        body = {"sender": message.sender, "ciphertexts": _blobs(message.ciphertexts)}
    elif isinstance(message, ShareDelivery):
        body = {"receiver": message.receiver, "ciphertexts": _blobs(message.ciphertexts), "sharers": message.sharers}
    elif isinstance(message, UnmaskRequest):
        body = {"alive": message.alive, "dropped": message.dropped}
    else:
        body = {
            "sender": message.sender,
            "seed_shares": _shares(message.seed_shares),
            "key_shares": _shares(message.key_shares),
        }
    return json.dumps({"type": type(message).__name__, **body}).encode()


def load_masked(data: bytes) -> MaskedInput:
    try:
        header, payload = data.split(b"\n", 1)
        sender, bits, count = (int(field) for field in header.split(b" "))
        if not 1 <= bits <= 64 or count < 0:
            raise ValueError(f"{count} words of {bits} bits")
        return MaskedInput(sender, unpack_words(payload, bits, count), bits)
    except ValueError as error:
        raise ProtocolViolation(f"malformed masked input: {error}") from None


def _body(data: bytes, kind: type) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolViolation(f"malformed {kind.__name__}: {error}") from None
    if not isinstance(body, dict) or body.pop("type", None) != kind.__name__:
        raise ProtocolViolation(f"expected a {kind.__name__} message")
    return body


def load(data: bytes, kind: type[Message]) -> Any:
    """The message of type `kind` in `data` (see `load_masked` for masked inputs)."""
    body = _body(data, kind)
    try:
        if kind is AdvertiseKeys:
            return AdvertiseKeys(int(body["sender"]), _unb64(body["cipher_key"]), _unb64(body["mask_key"]))
        if kind is KeyRoster:
            keys = {int(c): (_unb64(a), _unb64(b)) for c, (a, b) in body["keys"].items()}
            bits = body["modulus_bits"]
            if not isinstance(bits, int) or isinstance(bits, bool):
                raise ValueError(f"modulus_bits {bits!r} is not an integer")
            return KeyRoster(int(body["round"]), keys, bits)
        if kind is EncryptedShares:
            return EncryptedShares(int(body["sender"]), _unblobs(body["ciphertexts"]))
        if kind is ShareDelivery:
            return ShareDelivery(
                int(body["receiver"]), _unblobs(body["ciphertexts"]), [int(c) for c in body["sharers"]]
            )
        if kind is UnmaskRequest:
            return UnmaskRequest([int(c) for c in body["alive"]], [int(c) for c in body["dropped"]])
        if kind is UnmaskResponse:
            return UnmaskResponse(int(body["sender"]), _unshares(body["seed_shares"]), _unshares(body["key_shares"]))
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, binascii.Error) as error:
        raise ProtocolViolation(f"malformed {kind.__name__}: {error!r}") from None
    raise TypeError(f"no wire format for {kind.__name__}")
