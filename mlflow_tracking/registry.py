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
