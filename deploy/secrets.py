"""Credentials come from the environment only: never from params.yaml, never from the command line."""

from __future__ import annotations

import os

from fedtune.core.errors import InputError

PREFECT_AUTH = "FEDTUNE_PREFECT_AUTH"  # "user:password" the Prefect server demands (basic auth)
MLFLOW_USER, MLFLOW_PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


class MissingSecret(InputError):
    pass


def required(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise MissingSecret(f"{name} is not set: the deployment recipe refuses to run its servers without auth")
    return value


def prefect_auth() -> str:
    value = required(PREFECT_AUTH)
    if ":" not in value:
        raise MissingSecret(f"{PREFECT_AUTH} must look like user:password")
    return value


def mlflow_credentials() -> tuple[str, str]:
    return required(MLFLOW_USER), required(MLFLOW_PASSWORD)
