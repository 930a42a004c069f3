"""Secure aggregation between processes: the protocol's objects, their messages carried by the exchange.

The deployment's transport, where the simulation (`simulation.py`) passes the same messages in
memory. Client c writes its messages under its outbox, the server its broadcasts under `server/`,
all inside the round's namespace:

    client_<c>/<ns>/secagg/{advertise.json, shares.json, masked.npy, unmask.json}
    server/<ns>/secagg/{roster.json, delivery_<c>.json, unmask_request.json, aborted.txt}

A share delivery holds only AES-GCM ciphertexts addressed to its receiver, so the server folder
may be readable by every client. Each server stage waits for the clients it expects until
`stage_timeout` passes; whoever is missing then has dropped out, and the protocol's dropout
recovery removes the masks they left. A server that aborts says so (`aborted.txt`), so clients
stop waiting at once instead of at their deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtune.core.faults import crash_point
from fedtune.deployment.exchange import Exchange, UnreadableMessage, client_file, server_file
from fedtune.deployment.signing import ForgedMessage
from fedtune.privacy.secagg import wire
from fedtune.privacy.secagg.protocol import (
    AdvertiseKeys,
    EncryptedShares,
    KeyRoster,
    ProtocolViolation,
    SecAggAborted,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
)
from fedtune.privacy.secagg.simulation import RoundResult, unaccounted

CLIENT_FILES = {"advertise": "advertise.json", "share": "shares.json", "masked": "masked.npy", "unmask": "unmask.json"}
ABORTED = "aborted.txt"


def server_key(namespace: str, name: str) -> str:
    return server_file(namespace, f"secagg/{name}")


def client_key(client: int, namespace: str, name: str) -> str:
    return client_file(client, namespace, f"secagg/{name}")


def take_part(
    exchange: Exchange,
    namespace: str,
    client: int,
    params: SecAggParams,
    round_: int,
    encode: Callable[[], np.ndarray],
    deadline: float,
    poll_s: float,
) -> int:
    """Runs on the client: the four stages against the server's broadcasts; returns the bytes sent.

    The client's keys and seed live in this process only; its update leaves it masked."""
    me = SecAggClient(client, params, round_)

    def send(stage: str, message: wire.Message) -> int:
        return exchange.put(client_key(client, namespace, CLIENT_FILES[stage]), wire.dump(message))

    def receive(name: str, kind: type[wire.Message]) -> Any:
        data = exchange.wait(server_key(namespace, name), deadline, poll_s, abort=server_key(namespace, ABORTED))
        return wire.load(data, kind)

    sent = send("advertise", me.advertise())
    sent += send("share", me.share_keys(receive("roster.json", KeyRoster)))
    crash_point("secagg-shared", round_)  # shares out, no masked input yet: the server must unmask without it
    delivery = receive(f"delivery_{client}.json", ShareDelivery)
    sent += send("masked", me.masked_input(delivery, encode()))
    sent += send("unmask", me.unmask(receive("unmask_request.json", UnmaskRequest)))
    return sent


@dataclass
class RemoteRound:
    """The server's side: drives the stages over the exchange for the clients that reported."""

    exchange: Exchange
    namespace: str
    poll_s: float

    def run(
        self, clients: list[int], length: int, params: SecAggParams, round_: int, stage_timeout: float
    ) -> RoundResult:
        try:
            return self._run(clients, length, params, round_, stage_timeout)
        except (SecAggAborted, ProtocolViolation) as error:  # either way every client is told at once
            self.exchange.put(server_key(self.namespace, ABORTED), str(error).encode())
            if isinstance(error, SecAggAborted):
                raise
            raise SecAggAborted(f"secure aggregation stopped: {error}") from error

    def _publish(self, name: str, message: wire.Message) -> None:
        self.exchange.put(server_key(self.namespace, name), wire.dump(message))

    def _run(
        self, clients: list[int], length: int, params: SecAggParams, round_: int, stage_timeout: float
    ) -> RoundResult:
        params.check(len(clients))
        server = SecAggServer(params, round_, length)
        sent = dict.fromkeys(clients, 0)
        left_out: list[str] = []

        def gather(stage: str, expected: list[int], decode: Callable[[bytes], Any]) -> Iterator[Any]:
            """The messages of `expected` clients that arrive well-formed before the stage's deadline,
            each as it is read (the masked inputs go into the server's running sum one by one)."""
            deadline, pending = time.monotonic() + stage_timeout, set(expected)
            while pending:
                for c in sorted(pending):
                    try:
                        data = self.exchange.get(client_key(c, self.namespace, CLIENT_FILES[stage]))
                    except (ForgedMessage, UnreadableMessage) as error:  # as if it sent nothing valid
                        pending.discard(c)
                        left_out.append(f"client {c}: {error}")
                        continue
                    if data is None:
                        continue
                    pending.discard(c)
                    try:
                        message = decode(data)
                        if message.sender != c:
                            raise ProtocolViolation(f"its {stage} message claims to come from {message.sender}")
                    except ProtocolViolation as error:
                        left_out.append(f"client {c}: {error}")
                        continue
                    sent[c] += len(data)
                    yield message
                if pending and time.monotonic() >= deadline:
                    left_out.extend(
                        f"client {c}: missed the {stage} deadline of {stage_timeout:g} s" for c in sorted(pending)
                    )
                    break
                if pending:
                    time.sleep(self.poll_s)

        roster = server.collect_keys(gather("advertise", clients, lambda d: wire.load(d, AdvertiseKeys)))
        self._publish("roster.json", roster)
        deliveries = server.route_shares(
            list(gather("share", sorted(roster.keys), lambda d: wire.load(d, EncryptedShares)))
        )
        for receiver, delivery in deliveries.items():
            self._publish(f"delivery_{receiver}.json", delivery)

        def masked(data: bytes) -> Any:
            """A masked input of the round's length and modulus; another one drops its sender (rel-07)."""
            message = wire.load_masked(data)
            if message.vector.shape != (length,):
                raise ProtocolViolation(f"its masked input has shape {message.vector.shape}, not ({length},)")
            if message.bits != params.modulus_bits:
                raise ProtocolViolation(f"its masked input is mod 2^{message.bits}, not 2^{params.modulus_bits}")
            return message

        request = server.collect_masked(gather("masked", sorted(deliveries), masked))
        self._publish("unmask_request.json", request)
        total = server.unmask(request, list(gather("unmask", request.alive, lambda d: wire.load(d, UnmaskResponse))))
        return RoundResult(total, request.alive, sent, unaccounted(clients, request.alive, left_out))
