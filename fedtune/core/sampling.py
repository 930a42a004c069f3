"""Which clients train in a round and with which seeds: pure functions of (seed, round, client),
so a resumed run samples the same clients and every client redraws the same batches."""

from __future__ import annotations

import random


def sample_clients(num_clients: int, k: int, seed: int, round_: int) -> list[int]:
    """K of N clients, a pure function of (seed, round) so a resumed run samples the same ones."""
    if not 0 < k <= num_clients:
        raise ValueError(f"cannot sample {k} of {num_clients} clients")
    return sorted(random.Random(f"{seed}:{round_}").sample(range(num_clients), k))


def client_seed(seed: int, round_: int, client: int) -> int:
    return seed * 1_000_003 + round_ * 1_009 + client
