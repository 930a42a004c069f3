"""Cryptographic building blocks, all from the `cryptography` package.

- X25519 key agreement, HKDF-SHA256 to turn the shared secret into a 32-byte key per purpose.
- AES-256-GCM for the encrypted shares (authenticated; the associated data binds sender,
  receiver and round, so a share cannot be replayed elsewhere).
- The mask generator: AES-256-CTR keystream under a 32-byte seed (a cryptographic PRG), cut
  into 8-byte words reduced mod 2^bits; with a power-of-two modulus this is exactly uniform.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RAW = serialization.Encoding.Raw


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(RAW, serialization.PublicFormat.Raw)


def agree(private: X25519PrivateKey | bytes, peer_public: bytes, purpose: bytes) -> bytes:
    """A 32-byte key both sides derive from their X25519 exchange, separate for each purpose."""
    if isinstance(private, bytes):
        private = X25519PrivateKey.from_private_bytes(private)
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedtune-secagg/" + purpose).derive(shared)


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    return AESGCM(key).decrypt(ciphertext[:12], ciphertext[12:], associated)


@functools.lru_cache(maxsize=2)
def _zeros(size: int) -> bytes:
    return bytes(size)


def mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """`length` words uniform in Z_(2^bits) expanded from a 32-byte seed by AES-256-CTR.

    The keystream is written straight into the array (`update_into`, 10x faster than building
    bytes and converting them on 5M words); callers add masks in place with uint64 wrap-around,
    which is exact mod 2^bits because 2^bits divides 2^64."""
    if len(seed) != 32:
        raise ValueError("mask seeds are 32 bytes")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    size = 8 * length
    buffer = np.empty(size + 15, dtype=np.uint8)  # update_into wants room for one more block
    encryptor.update_into(_zeros(size), buffer.data)
    encryptor.finalize()
    words = buffer[:size].view("<u8")
    np.bitwise_and(words, np.uint64((1 << bits) - 1), out=words)
    return words
