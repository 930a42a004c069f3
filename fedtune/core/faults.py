"""Fault injection: named points where a test can kill the process, as a power cut or OOM kill would.

Crash recovery is only trustworthy if it is tested at the places where a crash hurts most
(mid-training, with some client replies in, between the two files of an aggregation, inside a
checkpoint write), and only a real SIGKILL skips every `finally`, `atexit` and buffered write the
way a lost machine does. FoundationDB's "buggify" does the same: the hooks stay in production
code and cost one environment lookup, so what is tested is the code that runs.
"""

from __future__ import annotations

import os
import signal

CRASH_AT = "FEDTUNE_CRASH_AT"


def crash_point(name: str, round_: int) -> None:
    """SIGKILL this process when `FEDTUNE_CRASH_AT` names `name:round_` (e.g. `aggregation:2`;
    several points are comma-separated: `secagg-shared:1,training:2`)."""
    if f"{name}:{round_}" in os.environ.get(CRASH_AT, "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)
