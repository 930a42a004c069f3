"""Seeds only a client can compute, from a secret kept in its own folder.

Noise that protects a client's data (DP-SGD, distributed DP shares) and its rounding must be
unpredictable to the server, or the server could regenerate and subtract it; a seed derived
from public values (config seed, round, client id) would be. The secret is created once per
client with the OS's CSPRNG and never leaves its folder; a re-run of the same round derives
the same seed, so a resumed round repeats rather than adds a release.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fedtune.core.atomic import atomic_write_bytes


def private_seed(folder: str | Path, round_: int, purpose: str) -> int:
    """A 256-bit seed from the client's secret, the round and what it is for."""
    path = Path(folder) / "noise.secret"
    if not path.exists():
        atomic_write_bytes(os.urandom(32), path)
    message = path.read_bytes() + round_.to_bytes(8, "little") + purpose.encode()
    return int.from_bytes(hashlib.sha256(message).digest(), "little")
