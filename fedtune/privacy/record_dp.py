"""Record-level DP-SGD inside a client, through Opacus (Abadi et al. 2016).

Cross-silo federations sample every client every round, where client-level DP gives weak
epsilon; what a hospital or bank must protect is each record. Each local step draws a Poisson
sample of the client's examples (rate q = batch_size / n), Opacus computes per-example gradients
of the LoRA weights (`GradSampleModule` hooks), clips each to `max_grad_norm`, adds Gaussian noise
of std `noise_multiplier * max_grad_norm` and averages over the expected batch size
(`DPOptimizer`), then the client's AdamW steps as usual.

The ledger is the data owner's: a JSON list of (noise multiplier, q, steps) per round kept in the
client's private folder, accounted by Opacus (RDP or PRV), and charged before each round it trains.
A client declines a round its target epsilon cannot afford. A round re-run after a crash is
charged again: its first update may have left the client, so counting it twice is the safe side.
The noise generator is seeded from the client's own secret, so the server cannot reproduce it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.config.schema import RecordDPSection
from fedtune.core.atomic import atomic_write_bytes
from fedtune.core.client_secret import private_seed
from fedtune.privacy.accounting import epsilon_of
from fedtune.training.client_feature import ClientFeature, ClientRound
from fedtune.training.dpsgd import DPSGD

LEDGER = "record_dp_ledger.json"


class PrivacyBudgetExhausted(RuntimeError):
    """The client's target epsilon cannot afford this round; it declines to train."""


@dataclass
class Ledger:
    path: Path
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @classmethod
    def load(cls, folder: str | Path) -> Ledger:
        path = Path(folder) / LEDGER
        history = [tuple(phase) for phase in json.loads(path.read_text())] if path.exists() else []
        return cls(path, history)

    def epsilon(self, cfg: RecordDPSection, planned: tuple[float, float, int] | None = None) -> float:
        return epsilon_of([*self.history, *([planned] if planned else [])], cfg.delta, cfg.accountant)

    def charge(self, cfg: RecordDPSection, phase: tuple[float, float, int], client: int) -> None:
        """Refuse a round the target cannot afford; otherwise record it before training starts."""
        after = self.epsilon(cfg, phase)
        if cfg.target_epsilon and after > cfg.target_epsilon:
            raise PrivacyBudgetExhausted(
                f"client {client}: this round would bring record-level epsilon to {after:.3f}, "
                f"above record_dp.target_epsilon {cfg.target_epsilon}"
            )
        self.history.append(phase)
        atomic_write_bytes(json.dumps(self.history).encode(), self.path)


class RecordDP(ClientFeature):
    """Record-level DP: the round's DP-SGD steps are charged to the client's own ledger first (a
    round it cannot afford is refused), then trained with per-example clipping and noise."""

    examples = {"record-level DP": {"record_dp": {"enabled": True}}}

    @classmethod
    def enabled(cls, cfg: Any, client: int) -> bool:
        return bool(cfg.record_dp.enabled)

    def prepare_training(self, r: ClientRound) -> None:
        section = r.cfg.record_dp
        ledger = Ledger.load(r.private_dir)
        rate = DPSGD.sample_rate(r.cfg.train.batch_size, len(r.train))
        ledger.charge(section, (section.noise_multiplier, rate, r.steps), r.client)
        r.dp = (section, private_seed(r.private_dir, r.round_, "dp-sgd"))
        r.report["record_epsilon"] = ledger.epsilon(section)
