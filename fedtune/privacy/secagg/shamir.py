"""Shamir t-of-n secret sharing over the prime field GF(2^521 - 1).

Written by hand because no well-kept Python library shares over a prime field large enough for
a 32-byte key (pycryptodome's Shamir works in GF(2^128) on 16-byte secrets). It is two textbook
formulas: evaluate a random degree t-1 polynomial with the secret as constant term at x = 1..n,
and Lagrange-interpolate at 0. Coefficients come from `secrets`, a CSPRNG.
"""

from __future__ import annotations

import secrets

PRIME = 2**521 - 1  # a Mersenne prime: every 64-byte secret is smaller than it

Share = tuple[int, int]  # (x, y)


def split(secret: bytes, threshold: int, xs: list[int]) -> dict[int, Share]:
    """Shares of `secret` for the points `xs` (distinct, non-zero); any `threshold` recover it."""
    value = int.from_bytes(secret, "big")
    if value >= PRIME or len(secret) > 64:
        raise ValueError("secret too large for the field")
    if not 2 <= threshold <= len(xs) or len(set(xs)) != len(xs) or 0 in xs:
        raise ValueError(f"need 2 <= threshold <= {len(xs)} distinct non-zero points, got {threshold}")
    coefficients = [value] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = (x, y)
    return shares


def combine(shares: list[Share], length: int) -> bytes:
    """The secret (as `length` bytes) from at least `threshold` distinct shares."""
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs):
        raise ValueError("duplicate share points")
    secret = 0
    for j, (xj, yj) in enumerate(shares):
        numerator, denominator = 1, 1
        for m, (xm, _) in enumerate(shares):
            if m != j:
                numerator = numerator * (-xm) % PRIME
                denominator = denominator * (xj - xm) % PRIME
        secret = (secret + yj * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret.bit_length() > 8 * length:  # too few or wrong shares give a random field element
        raise ValueError(f"the shares do not reconstruct a {length}-byte secret")
    return secret.to_bytes(length, "big")
