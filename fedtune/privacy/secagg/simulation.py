"""One secure-aggregation round in one process: the simulation's transport for the protocol.

Client and server objects exchange the protocol's messages in memory, stage by stage; a client
that breaks off (raises, or is listed in `silent`) drops out from that stage on, and the round
recovers while at least `threshold` remain. Every stage has a deadline: a reply that takes
longer than `stage_timeout` seconds is discarded and its client counts as dropped from that
stage on, as a server waiting on a network would. Each client's update is read, flattened and
encoded by that client's own code; the server side sees only the messages.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedtune.privacy.secagg.protocol import ProtocolViolation, SecAggClient, SecAggParams, SecAggServer
from fedtune.privacy.secagg.wire import packed_size

Encoded = Callable[[], Any]  # returns the client's encoded vector (uint64), computed on its side
STAGES = ("advertise", "share", "masked", "unmask")


@dataclass
class RoundResult:
    total: np.ndarray  # sum of the aggregated clients' encoded vectors mod 2^bits
    aggregated: list[int]
    bytes_up: dict[int, int] = field(default_factory=dict)  # protocol bytes each client sent
    left_out: list[str] = field(default_factory=list)


def run_round(
    inputs: dict[int, Encoded],
    length: int,
    params: SecAggParams,
    round_: int,
    silent: dict[str, set[int]] | None = None,
    stage_timeout: float = float("inf"),
) -> RoundResult:
    params.check(len(inputs))
    silent = silent or {}
    clients = {c: SecAggClient(c, params, round_) for c in inputs}
    server = SecAggServer(params, round_, length)
    sent = dict.fromkeys(clients, 0)
    left_out: list[str] = []
    gone: set[int] = set()

    def each(stage: str, act: Callable[[int], Any], size: Callable[[Any], int]) -> Iterator[Any]:
        """The stage's replies one at a time: the masked inputs reach the server's running sum as
        each client sends its own, so no more than one is held whatever the number of clients."""
        gone.update(silent.get(stage, set()) - gone)
        for c in sorted(set(clients) - gone):
            start = time.monotonic()
            try:
                reply = act(c)
            except ProtocolViolation as error:
                gone.add(c)
                left_out.append(f"client {c}: {error}")
                continue
            if time.monotonic() - start > stage_timeout:
                gone.add(c)
                left_out.append(f"client {c}: missed the {stage} deadline of {stage_timeout:g} s")
                continue
            sent[c] += size(reply)
            yield reply

    roster = server.collect_keys(each("advertise", lambda c: clients[c].advertise(), lambda m: 64))
    shares = each("share", lambda c: clients[c].share_keys(roster), lambda m: sum(map(len, m.ciphertexts.values())))
    deliveries = server.route_shares(list(shares))
    masked = each(
        "masked",
        lambda c: clients[c].masked_input(deliveries[c], inputs[c]()),
        lambda m: packed_size(m.vector.shape[0], m.bits),  # as `wire` sends it
    )
    request = server.collect_masked(masked)
    responses = each(
        "unmask",
        lambda c: clients[c].unmask(request),
        lambda m: len(json.dumps([m.seed_shares, m.key_shares], default=str)),
    )
    total = server.unmask(request, list(responses))
    return RoundResult(total, request.alive, sent, unaccounted(list(clients), request.alive, left_out))


def unaccounted(clients: list[int], alive: list[int], left_out: list[str]) -> list[str]:
    """`left_out` plus a reason for every client missing from `alive` that has none yet."""
    silent = [c for c in sorted(set(clients) - set(alive)) if not any(r.startswith(f"client {c}:") for r in left_out)]
    return [*left_out, *(f"client {c}: dropped out of secure aggregation" for c in silent)]
