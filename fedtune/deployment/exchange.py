"""The store through which the parties of a deployed federation pass files.

The coordinator publishes each round's global adapter (and the secure aggregation broadcasts)
under `server/`; client c publishes its update (or its protocol messages) and its report under
`client_<c>/`. Nothing else travels: the coordinator never opens a client's data directory, and
a client reads only what the server published. One key per file, written so that a reader sees
either nothing or the whole file (temp name, then rename; an object store's put is atomic).

The root is a local folder (one machine, or a shared mount) or any fsspec URL (s3://, gs://,
abfs:// with that backend installed). In the one-machine recipe (`deploy/parties.py`) each
client's worker runs in a mount namespace where the other clients' outboxes are hidden, so clients
cannot read each other's messages; on an object store, per-prefix IAM policies play that role.
Where `deploy` provisioned identities, a client's `Exchange` signs what it puts and the
coordinator's verifies every file of a client's outbox with that client's key (`signing.py`), so
where a file lies says nothing about who wrote it unless the signature agrees.
"""

from __future__ import annotations

import os
import re
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from fedtune.deployment.signing import Signer, Verifier

SERVER = "server"
# the files of one round (a namespace: run and round); secure aggregation's messages go under secagg/
GLOBAL, SERVER_VIEW = "global.safetensors", "server_view.safetensors"  # the coordinator's
UPDATE, REPORT = "update.safetensors", "report.json"  # each client's


def outbox(client: int) -> str:
    return f"client_{client}"


MAX_MESSAGE_BYTES = 4 << 30  # an adapter update is megabytes; nothing legitimate comes near 4 GiB
OUTBOX = re.compile(r"client_(\d+)/")
NAMESPACE = re.compile(r"[0-9a-f]{32}/round_\d{4}-[0-9a-f]{8}")  # an MLflow run id, the round, an attempt


def round_namespace(run_id: str, round_: int) -> str:
    """A fresh folder per attempt, so a resumed round never picks up a crashed attempt's replies."""
    return check_namespace(f"{run_id}/round_{round_:04d}-{uuid.uuid4().hex[:8]}")


def check_namespace(namespace: str) -> str:
    """`namespace` if it is one `round_namespace` makes; a deployed client refuses any other, so a
    caller cannot steer its update into another party's folder or out of the exchange (rel-08)."""
    if not NAMESPACE.fullmatch(namespace):
        raise ValueError(f"namespace {namespace!r} is not <run id>/round_NNNN-<attempt>")
    return namespace


def server_file(namespace: str, name: str) -> str:
    """The key of a file the coordinator publishes for the round `namespace`."""
    return f"{SERVER}/{namespace}/{name}"


def client_file(client: int, namespace: str, name: str) -> str:
    """The key of a file client `client` publishes for the round `namespace`."""
    return f"{outbox(client)}/{namespace}/{name}"


class UnreadableMessage(ValueError):
    """A published key that is not a plain file of bounded size (the receiver drops its sender)."""


class ExchangeTimeout(TimeoutError):
    """A file the protocol waits for did not appear before its deadline."""


class ExchangeAborted(RuntimeError):
    """The other side published that it gave up (the file's text says why)."""


class Exchange:
    """The store at `root`; with a `signer` (a client's) every put is signed, with a `verifier` (the
    coordinator's) every get from a client's outbox is verified (ForgedMessage otherwise)."""

    def __init__(self, root: str, signer: Signer | None = None, verifier: Verifier | None = None):
        self.root = root.rstrip("/")
        self.fs: fsspec.AbstractFileSystem = url_to_fs(self.root)[0]
        self.signer, self.verifier = signer, verifier

    def _path(self, key: str) -> str:
        """The key under the root; a key that could leave it (.., an absolute path) is refused."""
        parts = key.split("/")
        if key.startswith("/") or "\\" in key or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"exchange key {key!r} is not a plain relative path")
        return f"{self.root}/{key}"

    def put(self, key: str, data: bytes) -> int:
        """Publish `data` under `key` in one step; returns its size (the bytes sent)."""
        final = self._path(key)
        if self.signer is not None:
            data = self.signer.seal(key, data)
        parent, name = final.rsplit("/", 1)
        self.fs.makedirs(parent, exist_ok=True)
        staging = f"{parent}/.{name}.{uuid.uuid4().hex}"
        self.fs.pipe_file(staging, data)
        self.fs.mv(staging, final)
        return len(data)

    def get(self, key: str) -> bytes | None:
        """The file's bytes, or None while it has not been published; from a client's outbox, its
        verified payload (ForgedMessage unless that client's key signed it) when verifying."""
        try:
            data = self._read(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as error:  # a folder, a FIFO, a link, no permission: what a party may plant in its outbox
            raise UnreadableMessage(f"{key} is not a readable file ({error.strerror or error})") from None
        owner = OUTBOX.match(key)
        if self.verifier is not None and owner:
            return self.verifier.open(int(owner.group(1)), key, data)
        return data

    def _read(self, path: str) -> bytes:
        """The file at `path`, refused unless it is a regular file of at most MAX_MESSAGE_BYTES. On a
        local folder it is opened without following a link and without blocking (a FIFO or a link to
        /dev/zero cannot stall or flood the reader), then checked on the open descriptor."""
        if not isinstance(self.fs, LocalFileSystem):  # an object store holds plain objects only
            if self.fs.size(path) > MAX_MESSAGE_BYTES:
                raise OSError(f"larger than {MAX_MESSAGE_BYTES} bytes")
            return bytes(self.fs.cat_file(path))
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as file:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise OSError("not a regular file")
            if status.st_size > MAX_MESSAGE_BYTES:
                raise OSError(f"larger than {MAX_MESSAGE_BYTES} bytes")
            return file.read(MAX_MESSAGE_BYTES + 1)

    def wait(self, key: str, deadline: float, poll_s: float = 0.5, abort: str | None = None) -> bytes:
        """Poll until `key` appears or `deadline` (time.monotonic()) passes; raise at once when
        the `abort` key appears instead."""
        while True:
            data = self.get(key)
            if data is not None:
                return data
            reason = self.get(abort) if abort else None
            if reason is not None:
                raise ExchangeAborted(reason.decode(errors="replace"))
            if time.monotonic() >= deadline:
                raise ExchangeTimeout(f"{self._path(key)} did not appear in time")
            time.sleep(poll_s)


def coordinator_exchange(deployment: Any) -> Exchange:
    """The coordinator's view of the exchange: verifying every client file where keys were provisioned."""
    keys = deployment.client_keys
    return Exchange(deployment.exchange, verifier=Verifier.load(keys) if keys else None)


def client_exchange(deployment: Any, private_dir: str | Path) -> Exchange:
    """A client's view of the exchange: signing what it puts where its identity was provisioned."""
    return Exchange(deployment.exchange, signer=Signer.of(private_dir))
