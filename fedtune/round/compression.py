"""Update compression on the wire: 8- and 4-bit quantization, and top-k sparsification.

- `int8` / `int4`: per tensor, scale = max|x| / (2^(b-1) - 1); each coordinate is rounded
  stochastically to a neighbouring level (floor(x / scale + u), u ~ U[0, 1)), so the decoded value
  is unbiased and within one level of the original; int4 packs two levels per byte.
- `topk`: per tensor, the `topk_fraction` largest-magnitude coordinates (int32 indices, float32
  values). What is not sent is kept by the client as a residual and added to its next update
  (error feedback, Stich et al. 2018 / Karimireddy et al. 2019), so nothing is lost, only delayed.

Compressed tensors travel in the same safetensors file as plain updates, under prefixed names
(`q8/`, `q4/`, `scale/`, `idx/`, `val/`); `decompress` turns any of them back into float tensors
of the global adapter's shapes, before validation. Written by hand: the maths is a few lines, and
the libraries that do it (bitsandbytes' blockwise quantizers, PowerSGD hooks) quantize for
compute, not for a wire format with stochastic rounding and error feedback.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedtune.core.sampling import client_seed
from fedtune.model.adapters import AdapterState, add
from fedtune.training.client_feature import ClientFeature, ClientRound

Q8, Q4, SCALE, IDX, VAL = "q8/", "q4/", "scale/", "idx/", "val/"
PREFIXES = (Q8, Q4, SCALE, IDX, VAL)
METHODS = ("none", "int8", "int4", "topk")


class CompressionError(ValueError):
    """A compressed payload that cannot be decoded against the global adapter."""


def _quantize(tensor: torch.Tensor, bits: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    levels = 2 ** (bits - 1) - 1
    x = tensor.to(torch.float32)
    peak = float(x.abs().max()) if x.numel() else 0.0
    scale = peak / levels if peak > 0 else 1.0
    noise = torch.rand(x.shape, generator=generator)
    q = torch.floor(x / scale + noise).clamp(-levels, levels).to(torch.int8)
    return q, torch.tensor([scale], dtype=torch.float32)


def _pack4(q: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit levels per byte (offset by 8), low nibble first."""
    flat = (q.flatten().to(torch.int16) + 8).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, torch.zeros(1, dtype=torch.uint8)])
    return flat[0::2] | (flat[1::2] << 4)


def _unpack4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    flat = torch.stack([low, high], dim=1).flatten()[:numel]
    return flat.to(torch.int16) - 8


def compress(
    update: AdapterState, method: str, *, fraction: float, generator: torch.Generator
) -> tuple[AdapterState, AdapterState]:
    """(tensors to send, what was left out of them: the residual for error feedback)."""
    if method == "none":
        return dict(update), {}
    sent: AdapterState = {}
    residual: AdapterState = {}
    for key in sorted(update):  # stochastic rounding draws in a fixed order, whatever the dict's
        tensor = update[key]
        if method in ("int8", "int4"):
            q, scale = _quantize(tensor, 8 if method == "int8" else 4, generator)
            sent[SCALE + key] = scale
            sent[(Q8 if method == "int8" else Q4) + key] = q if method == "int8" else _pack4(q)
        elif method == "topk":
            flat = tensor.flatten().to(torch.float32)
            k = max(1, math.ceil(fraction * flat.numel()))
            index = flat.abs().topk(k).indices.sort().values
            sent[IDX + key], sent[VAL + key] = index.to(torch.int32), flat[index]
            rest = flat.clone()
            rest[index] = 0
            residual[key] = rest.view_as(tensor).to(tensor.dtype)
        else:
            raise CompressionError(f"unknown compression {method!r}; known: {', '.join(METHODS)}")
    return sent, residual


def decompress(payload: AdapterState, reference: AdapterState) -> AdapterState:
    """Float tensors shaped like `reference` from a plain or compressed payload; anything that does
    not fit (a missing scale, an index out of range, a wrong element count) is a CompressionError."""
    if not any(key.startswith(PREFIXES) for key in payload):
        return payload  # plain: the validator checks its tensors as they are
    out: AdapterState = {}
    for key, ref in reference.items():
        try:
            if Q8 + key in payload or Q4 + key in payload:
                scale = float(payload[SCALE + key].reshape(()))
                if Q8 + key in payload:
                    levels = payload[Q8 + key].to(torch.float32)
                else:
                    levels = _unpack4(payload[Q4 + key], ref.numel()).to(torch.float32)
                out[key] = (levels.reshape(ref.shape) * scale).to(ref.dtype)
            elif IDX + key in payload:
                index, values = payload[IDX + key].to(torch.int64), payload[VAL + key]
                if index.numel() != values.numel() or (index.numel() and int(index.max()) >= ref.numel()):
                    raise CompressionError(f"{key}: indices do not fit a tensor of {ref.numel()} elements")
                dense = torch.zeros(ref.numel(), dtype=torch.float32)
                dense[index] = values.to(torch.float32)
                out[key] = dense.view(ref.shape).to(ref.dtype)
            else:
                raise CompressionError(f"{key}: not in the payload, plain or compressed")
        except (KeyError, RuntimeError) as error:
            raise CompressionError(f"{key}: malformed compressed tensor ({error})") from None
    known = {p + k for k in reference for p in PREFIXES}
    stray = sorted(set(payload) - known)
    if stray:
        raise CompressionError(f"unexpected tensor {stray[0]}")
    return out


class Compression(ClientFeature):
    """The update travels compressed; top-k's left-out part waits in the client's folder and joins
    its next update (error feedback)."""

    examples = {
        "compression int8": {"compression": {"method": "int8"}},
        "compression top-k": {"compression": {"method": "topk"}},
    }

    @classmethod
    def enabled(cls, cfg: Any, client: int) -> bool:
        return cfg.compression.method != "none"

    def outgoing(self, r: ClientRound, update: AdapterState) -> AdapterState:
        section = r.cfg.compression
        residual = r.own_state("residual")
        target = add(update, residual) if residual else update
        generator = torch.Generator().manual_seed(client_seed(r.cfg.train.seed, r.round_, r.client))
        sent, left = compress(target, section.method, fraction=section.topk_fraction, generator=generator)
        if left:
            r.keep("residual", left)
        return sent
