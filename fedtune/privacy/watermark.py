"""Ownership watermarks in adapter weights (FedIPR-style, Li et al. 2022): a secret sign pattern.

An owner's key picks `bits` disjoint groups of `coordinates` adapter weights (among the tensors
whose names match `watermark.modules`), a random sign for each weight and a random target bit
for each group. Bit i of an adapter is the sign of its group's signed mean; while it trains, the
owner adds strength * sum_i max(0, margin - b_i * projection_i) to its loss, which pushes every
bit to its target. A verifier holding the key reads the bits of any adapter and reports the
bit-error rate (BER); at or below `threshold` the watermark is detected.

For an adapter the owner never touched, each bit is a fair coin (disjoint groups, random signs),
so the false-positive rate of the test is the binomial tail P(Bin(bits, 1/2) <= threshold * bits),
2.3e-7 for 64 bits at the default 0.2 threshold; `false_positive_rate` computes it, and the tests measure it.
FedIPR's sign loss acts on single weights; a signed mean over several weights is what lets one
owner's bits survive being averaged with other clients' updates (the others' drift averages out).

The key comes from a secret of its own in the owner's private folder (`watermark.secret`), not
the DP noise secret, so an owner can hand it to a verifier without revealing its noise.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtune.config.schema import WatermarkSection
from fedtune.core.atomic import atomic_write_bytes
from fedtune.core.errors import InputError
from fedtune.model.adapters import AdapterState, check_keys
from fedtune.training.client_feature import ClientFeature, ClientRound
from fedtune.training.loss_terms import LocalObjective

SECRET_FILE = "watermark.secret"


@dataclass(frozen=True)
class WatermarkKey:
    names: tuple[str, ...]  # adapter tensors that carry the watermark, in a fixed order
    index: torch.Tensor  # (bits, coordinates): positions in the concatenation of those tensors
    signs: torch.Tensor  # (bits, coordinates) of +-1
    targets: torch.Tensor  # (bits,) of +-1


def carriers(shapes: Mapping[str, torch.Size], section: WatermarkSection) -> list[str]:
    """The adapter tensors the watermark may use; every bit must find its own weights among them."""
    names = sorted(name for name in shapes if re.search(section.modules, name))
    if not names:
        raise InputError(f"watermark.modules: {section.modules!r} matches no adapter tensor (e.g. {min(shapes)})")
    room = sum(math.prod(shapes[name]) for name in names)
    if section.bits * section.coordinates > room:
        raise InputError(
            f"watermark: bits x coordinates = {section.bits * section.coordinates} exceeds the {room} weights "
            f"of the tensors matching {section.modules!r}"
        )
    return names


def owner_secret(private_dir: str | Path) -> bytes:
    """The owner's watermark secret, created once with the OS's CSPRNG."""
    path = Path(private_dir) / SECRET_FILE
    if not path.exists():
        atomic_write_bytes(os.urandom(32), path)
    return path.read_bytes()


def make_key(secret: bytes, shapes: Mapping[str, torch.Size], section: WatermarkSection) -> WatermarkKey:
    names = carriers(shapes, section)
    room = sum(math.prod(shapes[name]) for name in names)
    seed = int.from_bytes(hashlib.sha256(secret + b"fedtune-watermark").digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed)
    shape = (section.bits, section.coordinates)
    index = torch.randperm(room, generator=generator)[: section.bits * section.coordinates].view(shape)
    signs = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
    targets = torch.randint(0, 2, (section.bits,), generator=generator).float() * 2 - 1
    return WatermarkKey(tuple(names), index, signs, targets)


def projections(state: Mapping[str, torch.Tensor], key: WatermarkKey) -> torch.Tensor:
    """Each bit's signed mean of its weights (differentiable: the regularizer uses it)."""
    flat = torch.cat([state[name].reshape(-1).float() for name in key.names])
    return (flat[key.index] * key.signs).mean(dim=1)


def bit_error_rate(state: AdapterState, key: WatermarkKey) -> float:
    """Share of bits whose sign differs from the key's target (a zero counts as an error)."""
    return float((torch.sign(projections(state, key)) != key.targets).float().mean())


def false_positive_rate(bits: int, threshold: float) -> float:
    """P(an unwatermarked adapter's BER <= threshold): each of its bits is a fair coin."""
    errors = math.floor(threshold * bits + 1e-9)
    return sum(math.comb(bits, k) for k in range(errors + 1)) / 2**bits


class WatermarkTerm(LocalObjective):
    """The owner's hinge on its bits, added to the training loss."""

    def __init__(self, key: WatermarkKey, section: WatermarkSection, reference: AdapterState) -> None:
        self.key, self.section, self.reference = key, section, reference

    def extra_loss(self, named_params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        check_keys(named_params, self.reference, "watermark")
        current = {name: named_params[name] for name in self.key.names}
        hinge = torch.relu(self.section.margin - self.key.targets * projections(current, self.key))
        return self.section.strength * hinge.sum()


def owner_key(private_dir: str | Path, state: AdapterState, section: WatermarkSection) -> WatermarkKey:
    return make_key(owner_secret(private_dir), {k: v.shape for k, v in state.items()}, section)


def verify(state: AdapterState, secret: bytes, section: WatermarkSection) -> dict[str, float | bool]:
    """What a verifier with the owner's secret reports about an adapter."""
    key = make_key(secret, {k: v.shape for k, v in state.items()}, section)
    ber = bit_error_rate(state, key)
    return {
        "ber": ber,
        "detected": ber <= section.threshold,
        "false_positive_rate": false_positive_rate(section.bits, section.threshold),
    }


class Watermark(ClientFeature):
    """An owner signs what it trains: its secret's sign pattern is pushed into the adapter by a
    hinge term, and the bit-error rate of its local adapter is reported."""

    examples = {"watermark": {"watermark": {"clients": [0], "bits": 32, "coordinates": 8}}}

    @classmethod
    def enabled(cls, cfg: Any, client: int) -> bool:
        return client in cfg.watermark.clients

    def prepare_training(self, r: ClientRound) -> None:
        self.key = owner_key(r.private_dir, r.start, r.cfg.watermark)
        r.add_term(WatermarkTerm(self.key, r.cfg.watermark, r.start))

    def finish(self, r: ClientRound) -> None:
        r.report["watermark_ber_local"] = bit_error_rate(r.local_state, self.key)
