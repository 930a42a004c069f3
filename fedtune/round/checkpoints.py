"""Checkpoints: self-describing, atomically written, one per completed round.

A checkpoint holds everything needed to continue exactly (global adapter, strategy state,
history with sampled clients and seeds, tracking run id) and a SHA-256 of every file; a
truncated or partial checkpoint fails verification and the previous one is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.core.atomic import atomic_write_bytes, staged_directory
from fedtune.core.faults import crash_point
from fedtune.model.adapters import AdapterState, load_state, save_state
from fedtune.strategies.base import ServerState

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    round: int  # rounds completed
    global_state: AdapterState
    server_state: ServerState
    history: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # config fingerprint, tracking run id, ...


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoint_dir(root: str | Path, round_: int) -> Path:
    return Path(root) / "checkpoints" / f"round_{round_:04d}"


def save_checkpoint(checkpoint: Checkpoint, root: str | Path) -> Path:
    """Every file fsynced inside a staging directory that is then renamed into place."""
    target = checkpoint_dir(root, checkpoint.round)
    with staged_directory(target) as staging:
        save_state(checkpoint.global_state, staging / "global.safetensors")
        save_state(checkpoint.server_state, staging / "server_state.safetensors")
        files = {name: _sha256(staging / name) for name in ("global.safetensors", "server_state.safetensors")}
        manifest = {"round": checkpoint.round, "history": checkpoint.history, "meta": checkpoint.meta, "sha256": files}
        atomic_write_bytes(json.dumps(manifest, indent=2).encode(), staging / "checkpoint.json")
        crash_point("checkpoint", checkpoint.round)  # every file staged, none renamed into place
    return target


def load_checkpoint(path: Path) -> Checkpoint:
    manifest = json.loads((path / "checkpoint.json").read_text())
    for name, digest in manifest["sha256"].items():
        if _sha256(path / name) != digest:
            raise ValueError(f"{path / name} does not match its recorded SHA-256")
    return Checkpoint(
        round=manifest["round"],
        global_state=load_state(path / "global.safetensors"),
        server_state=load_state(path / "server_state.safetensors"),
        history=manifest["history"],
        meta=manifest["meta"],
    )


def latest_checkpoint(root: str | Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; damaged ones are skipped with a warning."""
    folder = Path(root) / "checkpoints"
    candidates = sorted(folder.glob("round_*"), reverse=True) if folder.exists() else []
    for path in candidates:
        try:
            return load_checkpoint(path)
        except (OSError, ValueError, KeyError) as error:
            log.warning("skipping damaged checkpoint %s: %s", path, error)
    return None
