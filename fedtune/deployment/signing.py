"""Each client organization's own credential: an Ed25519 key that signs everything it publishes.

`deploy` provisions the keys (`provision_identity`): the private key in the client's private folder
(mode 0600), the public keys in the coordinator's `client_keys.json` (`deployment.client_keys`).
A client signs each file it puts in the exchange; the coordinator verifies every file it reads
from client c's outbox with c's public key, so a report, an update or a secure-aggregation
message is client c's only if c's key signed it, wherever it was found and whatever it says
(rel-06). The signature covers the exchange key too (run, round, attempt, file), so a message
cannot be replayed into another round or passed off as another file. Ed25519 from `cryptography`
(RFC 8032); the framing is ours: 64 signature bytes, then the payload.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtune.core.atomic import write_private

IDENTITY = "identity.ed25519.pem"  # in the client's private folder
DOMAIN = b"fedtune-exchange-v1\x00"
SIGNATURE_BYTES = 64


class ForgedMessage(ValueError):
    """A file in a client's outbox that the client's key did not sign (or that was altered)."""


def _signed_text(key: str, data: bytes) -> bytes:
    return DOMAIN + key.encode() + b"\x00" + data


class Signer:
    """A client's side: signs what it publishes with the key in its private folder."""

    def __init__(self, private_dir: str | Path) -> None:
        pem = (Path(private_dir) / IDENTITY).read_bytes()
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{Path(private_dir) / IDENTITY}: not an Ed25519 private key")
        self._key = key

    @classmethod
    def of(cls, private_dir: str | Path) -> Signer | None:
        """The client's signer, or None where no identity was provisioned (a simulation)."""
        return cls(private_dir) if (Path(private_dir) / IDENTITY).exists() else None

    def seal(self, key: str, data: bytes) -> bytes:
        """`data` as published under `key`: its signature (64 bytes), then `data`."""
        return self._key.sign(_signed_text(key, data)) + data


class Verifier:
    """The coordinator's side: every client's public key, from `deployment.client_keys`."""

    def __init__(self, public_keys: dict[int, bytes]) -> None:
        self._keys = {client: Ed25519PublicKey.from_public_bytes(raw) for client, raw in public_keys.items()}

    @classmethod
    def load(cls, path: str | Path) -> Verifier:
        """Read `{client: base64 raw public key}` (JSON), as `provision_identity` writes it."""
        try:
            table = json.loads(Path(path).read_text())
            keys = {int(client): base64.b64decode(raw, validate=True) for client, raw in table.items()}
            if len(keys) != len(table):  # "1" and "01" would name one client twice
                raise ValueError("a client is listed twice")
            return cls(keys)
        except (OSError, ValueError, TypeError, AttributeError, RecursionError) as error:
            raise ValueError(f"deployment.client_keys {path}: not a table of Ed25519 public keys ({error})") from None

    def open(self, client: int, key: str, sealed: bytes) -> bytes:
        """The payload of `sealed`, read from client `client`'s outbox under `key`; ForgedMessage unless
        `client`'s key signed exactly this payload for exactly this key."""
        public = self._keys.get(client)
        if public is None:
            raise ForgedMessage(f"no public key is provisioned for client {client}")
        signature, data = sealed[:SIGNATURE_BYTES], sealed[SIGNATURE_BYTES:]
        try:
            public.verify(signature, _signed_text(key, data))
        except InvalidSignature:
            raise ForgedMessage(f"{key} is not signed by client {client}'s key") from None
        return data


def provision_identity(private_dir: Path) -> bytes:
    """A new Ed25519 key in `private_dir` (readable by its owner only); returns the raw public key."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_private(pem, private_dir / IDENTITY)
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def write_public_keys(public_keys: dict[int, bytes], path: Path) -> Path:
    path.write_text(json.dumps({str(c): base64.b64encode(raw).decode() for c, raw in sorted(public_keys.items())}))
    return path
