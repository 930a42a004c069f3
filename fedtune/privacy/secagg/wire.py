"""The protocol's messages as bytes, for a deployment that carries them between processes.

JSON for the small messages (public keys and ciphertexts in base64; Shamir shares as decimal
integers, since a point of GF(2^521 - 1) overflows JSON numbers in most readers) and the NumPy
`.npy` format for the masked vector. Every decode checks the message's shape and raises
ProtocolViolation on anything else, so a malformed message drops its sender instead of crashing
the receiver.
"""

from __future__ import annotations

import base64
import binascii
import io
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


def dump(message: Message) -> bytes:
    if isinstance(message, MaskedInput):
        buffer = io.BytesIO()
        np.save(buffer, message.vector.astype(np.uint64), allow_pickle=False)
        return f"{message.sender}\n".encode() + buffer.getvalue()
    body: dict[str, Any]
    if isinstance(message, AdvertiseKeys):
        body = {"sender": message.sender, "cipher_key": _b64(message.cipher_key), "mask_key": _b64(message.mask_key)}
    elif isinstance(message, KeyRoster):
        body = {"round": message.round, "keys": {str(c): [_b64(a), _b64(b)] for c, (a, b) in message.keys.items()}}
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
        sender, payload = data.split(b"\n", 1)
        vector = np.load(io.BytesIO(payload), allow_pickle=False)
        if vector.dtype != np.uint64 or vector.ndim != 1:
            raise ValueError(f"a {vector.dtype} array of {vector.ndim} dimensions")
        return MaskedInput(int(sender), vector)
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
            return KeyRoster(int(body["round"]), keys)
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
    except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as error:
        raise ProtocolViolation(f"malformed {kind.__name__}: {error!r}") from None
    raise TypeError(f"no wire format for {kind.__name__}")
