"""The model registry as continual learning uses it: the version an alias names, its adapter, promotion.

A version carries its lineage (parent version, data versions, rounds) as tags, so the registry
alone answers what an adapter was trained from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlflow_tracking.runs import RunTracker


@dataclass(frozen=True)
class Version:
    number: str
    run_id: str
    source: str


def aliased_version(tracking_uri: str, name: str, alias: str) -> Version | None:
    """The version `alias` names; None while the model or the alias does not exist yet."""
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    number = model.aliases.get(alias)
    if number is None:
        return None
    found = client.get_model_version(name, str(number))
    return Version(str(found.version), str(found.run_id), str(found.source))


def download(tracking_uri: str, version: Version, dst: str) -> str:
    """The version's files (for an adapter: its peft folder) under `dst`; returns their local path."""
    return mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=dst, tracking_uri=tracking_uri)


def promote(run: RunTracker, artifact_path: str, name: str, alias: str, tags: Mapping[str, str]) -> str:
    """Register the run's artifact as a new version tagged `tags`, then point `alias` at it."""
    number = run.register(artifact_path, name, tags)
    run.client.set_registered_model_alias(name, alias, number)
    return number


COMPARED_ON = ("lineage.data.test", "base_model", "peft_method")  # tags two versions must share to compare


def register_if_better(
    run: RunTracker, artifact_path: str, name: str, alias: str, test_loss: float, tags: Mapping[str, str], always: bool
) -> tuple[str | None, str]:
    """Register the run's final adapter when no version holds `alias` yet or when its test loss is
    below the aliased version's on the same held-out set, base model and PEFT method (the tags in
    COMPARED_ON; `lineage.data.test` is the test split's DVC md5), then move `alias` to it; with
    `always`, register it either way and move the alias only if better. An adapter that cannot be
    compared (the champion was scored on another test set or is another model's) is registered
    without the alias, so nothing is lost and no incomparable adapter becomes the champion.
    Returns (version or None, the decision in words). A run that is already the champion at the
    same round (tag `round`) returns its version, so finishing again on `--resume` registers
    nothing twice; a run resumed for more rounds competes with its own earlier end."""
    champion = aliased_version(run.client.tracking_uri, name, alias)
    held = run.client.get_model_version(name, champion.number).tags if champion is not None else {}
    if champion is not None and champion.run_id == run.run_id and held.get("round") == tags.get("round"):
        return champion.number, f"already {name}@{alias} (version {champion.number})"
    better, comparable, reason = True, True, f"no {name}@{alias} yet"
    if champion is not None:
        differs = [key for key in COMPARED_ON if held.get(key) != tags.get(key) or tags.get(key) in (None, "unknown")]
        if differs:
            better, comparable = False, False
            reason = f"not comparable with version {champion.number} ({', '.join(differs)} differ)"
        else:
            better = test_loss < float(held["test_loss"])
            reason = f"test loss {test_loss:.6f} vs {float(held['test_loss']):.6f} of version {champion.number}"
    if not (better or always or not comparable):
        return None, f"not registered: {reason}"
    number = run.register(artifact_path, name, {**tags, "test_loss": f"{test_loss:.6f}"})
    if better:
        run.client.set_registered_model_alias(name, alias, number)
    return number, f"registered version {number}{f' as {alias}' if better else ''}: {reason}"
