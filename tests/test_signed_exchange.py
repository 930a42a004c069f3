"""rel-06: a client's messages count as that client's only if its own key signed them.

`deploy` gives each client organization an Ed25519 key (private in its own folder, public in the
coordinator's `client_keys.json`); the coordinator verifies every file it reads from a client's
outbox. Where a file lies, and what it says about its sender, are not evidence."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from deploy.parties import provision
from fedtune.deployment.exchange import REPORT, Exchange, UnreadableMessage, client_file
from fedtune.deployment.signing import IDENTITY, ForgedMessage, Signer, Verifier, provision_identity, write_public_keys
from fedtune.privacy.secagg.protocol import SecAggParams
from fedtune.privacy.secagg.remote import RemoteRound, take_part
from flows.remote_clients import _collect

NAMESPACE = "0123456789abcdef0123456789abcdef/round_0001-0a1b2c3d"


@pytest.fixture
def parties(tmp_path: Path) -> tuple[dict[int, Exchange], Exchange]:
    """Three clients' signing exchanges and the coordinator's verifying one, over one folder."""
    root, keys = tmp_path / "exchange", {}
    for c in range(3):
        (tmp_path / f"private_{c}").mkdir()
        keys[c] = provision_identity(tmp_path / f"private_{c}")
    verifier = Verifier.load(write_public_keys(keys, tmp_path / "client_keys.json"))
    clients = {c: Exchange(str(root), signer=Signer(tmp_path / f"private_{c}")) for c in range(3)}
    return clients, Exchange(str(root), verifier=verifier)


def _report(client: int) -> bytes:
    numbers = ("train_loss", "bytes_up", "bytes_down", "train_loss_first", "train_loss_last", "val_loss", "steps")
    row = {"client": client, "round": 1, "num_examples": 10, "tokens": 100, "seconds": 1.0, "val_seconds": 0.1}
    return json.dumps(row | dict.fromkeys(numbers, 1)).encode()


def test_a_file_is_a_clients_only_if_its_own_key_signed_it(parties, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    clients, coordinator = parties
    key = client_file(0, NAMESPACE, REPORT)
    clients[0].put(key, _report(0))
    assert coordinator.get(key) == _report(0)  # signed by its owner: the payload, signature stripped
    sealed = (tmp_path / "exchange" / key).read_bytes()

    clients[1].put(key, _report(0))  # client 1 writes into client 0's outbox, signing with its own key
    with pytest.raises(ForgedMessage, match=f"{key} is not signed by client 0's key"):
        coordinator.get(key)
    Exchange(str(tmp_path / "exchange")).put(key, _report(0))  # unsigned
    with pytest.raises(ForgedMessage):
        coordinator.get(key)
    (tmp_path / "exchange" / key).write_bytes(sealed[:-2] + b"9}")  # client 0's, altered in transit
    with pytest.raises(ForgedMessage):
        coordinator.get(key)
    replayed = client_file(0, NAMESPACE.replace("round_0001", "round_0002"), REPORT)
    Exchange(str(tmp_path / "exchange")).put(replayed, sealed)  # last round's signed report, replayed
    with pytest.raises(ForgedMessage):
        coordinator.get(replayed)


def test_a_forged_report_drops_its_client_with_the_reason(parties, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The coordinator's collection refuses it (a ValueError, which `train_remotely` records as that
    client's reason for dropping out) instead of counting client 0 twice as in the case."""
    clients, coordinator = parties
    clients[1].put(client_file(0, NAMESPACE, REPORT), _report(0))
    with pytest.raises(ValueError, match="not signed by client 0's key"):
        _collect(coordinator, 0, 1, NAMESPACE, tmp_path, masked=True)
    clients[0].put(client_file(0, NAMESPACE, REPORT), _report(0))
    assert _collect(coordinator, 0, 1, NAMESPACE, tmp_path, masked=True)["client"] == 0


def test_a_forged_protocol_message_drops_that_client_and_the_round_goes_on(parties) -> None:  # type: ignore[no-untyped-def]
    """Client 2's secure-aggregation messages are written by client 1's key: the server leaves
    client 2 out at the key advertisement and sums clients 0 and 1 exactly."""
    clients, coordinator = parties
    clients[2] = clients[1]  # whoever writes client 2's outbox holds client 1's key, not client 2's
    rng = np.random.default_rng(3)
    vectors = {c: rng.integers(0, 1 << 20, size=32, dtype=np.uint64) for c in range(3)}
    params, outcome = SecAggParams(threshold=2), {}

    def client(c: int, vector: Callable[[], np.ndarray]) -> None:
        try:
            outcome[c] = take_part(clients[c], NAMESPACE, c, params, 1, vector, time.monotonic() + 60, 0.02)
        except BaseException as error:  # noqa: BLE001 (recorded for the test to inspect)
            outcome[c] = error

    threads = [threading.Thread(target=client, args=(c, lambda v=v: v)) for c, v in vectors.items()]
    for thread in threads:
        thread.start()
    result = RemoteRound(coordinator, NAMESPACE, 0.02).run([0, 1, 2], 32, params, 1, stage_timeout=3)
    for thread in threads:
        thread.join(timeout=60)
    assert result.aggregated == [0, 1]
    assert np.array_equal(result.total, (vectors[0] + vectors[1]) & params.modulus_mask)
    assert result.left_out[0].startswith("client 2: client_2/") and "not signed by client 2's key" in result.left_out[0]


def test_deploy_gives_each_client_its_own_key_and_the_coordinator_the_public_ones(tmp_path: Path) -> None:
    partitions = tmp_path / "partitions"
    for c in range(2):
        (partitions / f"client_{c}").mkdir(parents=True)
        (partitions / f"client_{c}" / "train.jsonl").write_text("{}\n")
    (partitions / "test.jsonl").write_text("{}\n")
    layout = provision(partitions, tmp_path / "parties", 2)
    keys = json.loads(layout.client_keys.read_text())
    assert sorted(keys) == ["0", "1"] and keys["0"] != keys["1"]
    for c in range(2):
        identity = layout.client_home(c) / "private" / IDENTITY
        assert stat.S_IMODE(identity.stat().st_mode) == 0o600
        assert not list(layout.coordinator.rglob(IDENTITY))  # no private key in the coordinator's folder
    signed = Exchange(str(layout.exchange), signer=Signer(layout.client_home(1) / "private"))
    signed.put(client_file(1, NAMESPACE, REPORT), _report(1))
    verifying = Exchange(str(layout.exchange), verifier=Verifier.load(layout.client_keys))
    assert verifying.get(client_file(1, NAMESPACE, REPORT)) == _report(1)


def test_a_client_on_its_own_machine_makes_its_key_and_prints_the_public_half(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from deploy.__main__ import app

    private = tmp_path / "private"
    made = CliRunner().invoke(app, ["identity", str(private)])
    assert made.exit_code == 0, made.output
    verifier = Verifier.load(write_public_keys({4: base64.b64decode(made.output.strip())}, tmp_path / "keys.json"))
    key = client_file(4, NAMESPACE, REPORT)
    assert verifier.open(4, key, Signer(private).seal(key, b"{}")) == b"{}"
    again = CliRunner().invoke(app, ["identity", str(private)])  # never overwrites the key the coordinator holds
    assert again.exit_code == 2 and "exists" in again.output


@pytest.mark.parametrize("plant", ["folder", "fifo", "link to /dev/zero"])
def test_what_a_party_plants_in_its_outbox_drops_it_instead_of_stalling_the_coordinator(
    parties, tmp_path: Path, plant: str
) -> None:
    """A client owns its outbox: a folder, a FIFO or a link where its report should be must be a
    clean drop of that client (a ValueError, which `train_remotely` records), not an
    IsADirectoryError, a read that blocks forever or one that fills the coordinator's memory."""
    _, coordinator = parties
    path = tmp_path / "exchange" / client_file(0, NAMESPACE, REPORT)
    path.parent.mkdir(parents=True)
    {"folder": path.mkdir, "fifo": lambda: os.mkfifo(path), "link to /dev/zero": lambda: path.symlink_to("/dev/zero")}[
        plant
    ]()
    with pytest.raises(UnreadableMessage, match="report.json is not a readable file"):
        _collect(coordinator, 0, 1, NAMESPACE, tmp_path, masked=True)


@pytest.mark.parametrize("table", ['{"0": 5}', '{"0": null}', '{"0": ["x"]}', "[1]", '{"0": "%%%"}', "[" * 100000])
def test_a_malformed_keys_file_is_one_named_error(tmp_path: Path, table: str) -> None:
    path = tmp_path / "client_keys.json"
    path.write_text(table)
    with pytest.raises(ValueError, match="deployment.client_keys .*: not a table of Ed25519 public keys"):
        Verifier.load(path)


def test_a_client_listed_twice_in_the_keys_file_is_refused(tmp_path: Path) -> None:
    raw = provision_identity(tmp_path)
    path = write_public_keys({1: raw}, tmp_path / "client_keys.json")
    path.write_text(path.read_text().replace("}", ', "01": ' + json.dumps(json.loads(path.read_text())["1"]) + "}"))
    with pytest.raises(ValueError, match="listed twice"):
        Verifier.load(path)
