"""Privacy accounting through Opacus' accountants, shared by client-level and record-level DP.

A history is Opacus' own ledger format: (noise multiplier, sample rate, steps) per phase.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opacus.accountants import PRVAccountant, RDPAccountant

ACCOUNTANTS: dict[str, Any] = {"rdp": RDPAccountant, "prv": PRVAccountant}
History = Sequence[tuple[float, float, int]]


def epsilon_of(history: History, delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by the composition of `history` at the given delta."""
    phases = [tuple(phase) for phase in history if phase[2] > 0]
    if not phases:
        return 0.0
    ledger = ACCOUNTANTS[accountant]()
    ledger.history = phases
    return float(ledger.get_epsilon(delta))
