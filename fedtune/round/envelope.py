"""Every received update is checked before it can reach an aggregator.

An update file carries, in its safetensors metadata, the round and client it was made for and a
random nonce, so a stale update (another round), one filed under another client's name or a
replay (a nonce seen before) is refused like a malformed one: NaN/Inf, missing or extra keys,
wrong shape or dtype, an implausible example count, an oversized payload. Each refusal is an
`UpdateRejected` naming the client and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedtune.core.atomic import atomic_write_bytes
from fedtune.hetero.ranks import truncate
from fedtune.model.adapters import AdapterState, load_state, to_bytes
from fedtune.round.compression import CompressionError, decompress

ROUND, CLIENT, NONCE = "fedtune.round", "fedtune.round.client", "fedtune.nonce"


class UpdateRejected(ValueError):
    def __init__(self, client: int, reason: str, tensor: str | None = None) -> None:
        self.client, self.reason, self.tensor = client, reason, tensor
        where = f" tensor {tensor}" if tensor else ""
        super().__init__(f"client {client}{where}: {reason}")


class RoundAborted(RuntimeError):
    """Too few valid updates; nothing was aggregated and the run can resume from the last round."""


def write_update(
    state: AdapterState, path: str | Path, *, round_: int, client: int, extras: dict[str, AdapterState] | None = None
) -> int:
    """Write an update with its round, client and a fresh nonce, and any `extras` (a strategy's
    adapter-shaped payloads, as `name/key` tensors in the same file); returns the wire size in bytes."""
    meta = {ROUND: str(round_), CLIENT: str(client), NONCE: secrets.token_hex(16)}
    extra = {f"{name}/{key}": tensor for name, payload in (extras or {}).items() for key, tensor in payload.items()}
    data = to_bytes({**state, **extra}, metadata=meta)
    atomic_write_bytes(data, path)
    return len(data)


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header's metadata (an 8-byte little-endian length, then JSON)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return dict(header.get("__metadata__") or {})


@dataclass
class UpdateValidator:
    """Checks one round's updates against the global adapter they were trained from."""

    global_state: AdapterState
    round: int
    max_bytes: int
    max_examples: int
    extras: tuple[str, ...] = ()  # the strategy's payloads expected beside the delta
    ranks: dict[int, int] = field(default_factory=dict)  # clients that send a LoRA rank of their own (HetLoRA)
    seen_nonces: set[str] = field(default_factory=set)

    def reference(self, client: int) -> AdapterState:
        """The tensors a client's update must match: the global's, truncated to its rank."""
        return truncate(self.global_state, self.ranks[client]) if client in self.ranks else self.global_state

    def split(self, state: AdapterState) -> tuple[AdapterState, dict[str, AdapterState]]:
        """A checked file's delta and its extras by name."""
        delta = {key: state[key] for key in self.global_state}
        return delta, {name: {key: state[f"{name}/{key}"] for key in self.global_state} for name in self.extras}

    def check(self, client: int, path: str | Path, num_examples: int) -> AdapterState:
        path = Path(path)
        size = path.stat().st_size
        if size > self.max_bytes:
            raise UpdateRejected(client, f"payload of {size} bytes exceeds the limit of {self.max_bytes}")
        if not isinstance(num_examples, int) or not 0 < num_examples <= self.max_examples:
            raise UpdateRejected(client, f"example count {num_examples!r} is not in 1..{self.max_examples}")
        try:
            meta = read_metadata(path)
            state = load_state(path)
        except Exception as error:  # any parse failure of untrusted bytes is a rejection
            raise UpdateRejected(client, f"unreadable payload ({type(error).__name__}: {error})") from None
        self._check_envelope(client, meta)
        extras, reference = tuple(f"{name}/" for name in self.extras), self.reference(client)
        try:  # a compressed delta back to float tensors (a plain one passes as it is)
            delta = decompress({k: v for k, v in state.items() if not k.startswith(extras)}, reference)
        except CompressionError as error:
            raise UpdateRejected(client, f"undecodable payload ({error})") from None
        state = {**delta, **{k: v for k, v in state.items() if k.startswith(extras)}}
        self._check_tensors(client, state, reference)
        return state

    def _check_envelope(self, client: int, meta: dict[str, str]) -> None:
        if meta.get(ROUND) != str(self.round):
            raise UpdateRejected(client, f"update is for round {meta.get(ROUND)}, not {self.round}")
        if meta.get(CLIENT) != str(client):
            raise UpdateRejected(client, f"update is signed for client {meta.get(CLIENT)}")
        nonce = meta.get(NONCE)
        if not nonce or nonce in self.seen_nonces:
            raise UpdateRejected(client, "missing or replayed nonce (duplicate update)")
        self.seen_nonces.add(nonce)

    def _check_tensors(self, client: int, state: AdapterState, reference: AdapterState) -> None:
        expected = {**reference}
        for name in self.extras:
            expected |= {f"{name}/{key}": tensor for key, tensor in reference.items()}
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing:
            raise UpdateRejected(client, "missing tensor", missing[0])
        if extra:
            raise UpdateRejected(client, "unexpected tensor", extra[0])
        for key, like in expected.items():
            tensor = state[key]
            if tensor.shape != like.shape:
                raise UpdateRejected(client, f"shape {tuple(tensor.shape)} != {tuple(like.shape)}", key)
            if tensor.dtype != like.dtype:
                raise UpdateRejected(client, f"dtype {tensor.dtype} != {like.dtype}", key)
            if not torch.isfinite(tensor).all():
                raise UpdateRejected(client, "NaN or Inf values", key)
