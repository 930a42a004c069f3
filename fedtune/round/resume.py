"""Resume means the same run: what a checkpoint records of its config and data, and what may change.

A checkpoint's meta holds the resolved config and a digest of the partition files its rounds
trained and were scored on. `--resume` with any other value of a field that shapes what is
computed (a learning rate, a seed, the strategy, the LoRA rank, the data) would splice two runs
into one record (transformers#18070; case 08, rel-12), so it is refused, naming every field that
differs. Only fields that say how long the run goes or where its clients run may change; the
flow records such a change in MLflow (params are immutable there, so as a tag).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedtune.core.errors import InputError
from fedtune.round.checkpoints import latest_checkpoint

SAFE_ON_RESUME = {
    "federation.rounds": "how many rounds the run has (not fewer than it has completed)",
    "federation.client_timeout_s": "how long a client may take before it is left out of a round",
    "federation.max_parallel_clients": "how many simulated clients train at once (each has its own seed)",
    "federation.runner": "where simulated clients train (threads, Dask or Ray)",
    "federation.cluster_address": "which Dask or Ray cluster they train on",
    "eval.every_rounds": "which rounds the global adapter is evaluated after (not what is trained)",
}


class ResumeRefused(InputError):
    """`--resume` with a config or data that differ from the checkpoint's in what they compute."""


def config_changes(before: Mapping[str, Any], after: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """{dotted field: (value before, value after)} for every leaf that differs (nested dicts walked)."""
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changes.update(config_changes(old, new, f"{prefix}{key}."))
        elif old != new:
            changes[f"{prefix}{key}"] = (old, new)
    return changes


def data_version(partitions_dir: str | Path) -> str:
    """SHA-256 over every partition file (relative path and bytes): the clients' splits and the test set."""
    root = Path(partitions_dir)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.jsonl")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def allowed_changes(meta: Mapping[str, Any], config: Mapping[str, Any], completed: int) -> dict[str, tuple[Any, Any]]:
    """The changes from the checkpoint's config (`meta["config"]`) to `config`, all of them safe.

    Raises ResumeRefused naming every other change (field, checkpoint's value, new value), or a
    round count below the rounds already completed."""
    if "config" not in meta:
        raise ResumeRefused(f"the checkpoint of round {completed} records no config (an older fedtune wrote it)")
    changes = config_changes(meta["config"], config)
    unsafe = {path: change for path, change in changes.items() if path not in SAFE_ON_RESUME}
    problems = [f"{path}: {old!r} in the checkpoint, {new!r} now" for path, (old, new) in unsafe.items()]
    rounds = config.get("federation", {}).get("rounds", completed)
    if rounds < completed:
        problems.append(f"federation.rounds: {rounds} is fewer than the {completed} rounds already completed")
    if problems:
        raise ResumeRefused(
            f"--resume continues the run checkpointed after round {completed}, but the config differs in what it "
            "computes:\n  " + "\n  ".join(problems) + "\nRestore those values, or start a new run without --resume "
            f"(only {', '.join(SAFE_ON_RESUME)} may change on resume)."
        )
    return changes


def source_version(source: str) -> str | None:
    """SHA-256 of `data.source` when it is a file (a generated or hub source has none here)."""
    path = Path(source).expanduser()
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def check_source(meta: Mapping[str, Any], source: str, completed: int) -> None:
    """Raises ResumeRefused when the data file changed since the run started."""
    recorded = meta.get("source_version")
    if recorded is not None and source_version(source) != recorded:
        raise ResumeRefused(
            f"data.source: {source} changed since the run started (its SHA-256 differs); the {completed} "
            "checkpointed rounds trained on the old file: restore it, or start a new run without --resume"
        )


def check_resume(config: Any) -> None:
    """`allowed_changes` and `check_source` against the newest valid checkpoint under
    `federation.output_dir`, if any."""
    done = latest_checkpoint(config.federation.output_dir)
    if done is not None:
        allowed_changes(done.meta, config.model_dump(mode="json"), done.round)
        check_source(done.meta, config.data.source, done.round)


def same_data(meta: Mapping[str, Any], partitions_dir: str | Path) -> bool:
    """Whether the partition files are the ones the checkpointed rounds used (deployed: not recorded, True)."""
    recorded = meta.get("data_version")
    return recorded is None or (Path(partitions_dir).is_dir() and data_version(partitions_dir) == recorded)


def check_data(meta: Mapping[str, Any], partitions_dir: str | Path, completed: int) -> None:
    """Raises ResumeRefused when the partition files are not the ones the checkpointed rounds used."""
    if not same_data(meta, partitions_dir):
        raise ResumeRefused(
            f"data.partitions_dir: the partitions under {partitions_dir} are not the ones the {completed} checkpointed "
            "rounds trained and were scored on (their SHA-256 differs); restore them (`dvc checkout`) or start a new "
            "run without --resume"
        )
