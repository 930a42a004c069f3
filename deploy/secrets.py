"""Credentials come from the environment only: never from params.yaml, never from the command line."""

from __future__ import annotations

import os

from fedtune.core.errors import InputError

PREFECT_AUTH = "FEDTUNE_PREFECT_AUTH"  # "user:password" the Prefect server demands (basic auth)
MLFLOW_USER, MLFLOW_PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


MIN_PASSWORD = 12  # characters; a guessable password on an open port is no auth
KNOWN_DEFAULTS = {"password1234", "password", "admin", "changeme"}  # password1234: MLflow's default admin


class MissingSecret(InputError):
    pass


def strong(name: str, user: str, password: str) -> str:
    """`password`, refused (MissingSecret naming `name`) when empty, short, a known default or the user name."""
    if len(password) < MIN_PASSWORD or password.lower() in KNOWN_DEFAULTS or password == user:
        raise MissingSecret(
            f"{name}: the password is weak (empty, under {MIN_PASSWORD} characters, a known default or the user "
            "name); the deployment recipe refuses to guard its servers with it"
        )
    return password


def required(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise MissingSecret(f"{name} is not set: the deployment recipe refuses to run its servers without auth")
    return value


def prefect_auth() -> str:
    value = required(PREFECT_AUTH)
    user, colon, password = value.partition(":")
    if not colon or not user:
        raise MissingSecret(f"{PREFECT_AUTH} must look like user:password")
    strong(PREFECT_AUTH, user, password)
    return value


def mlflow_credentials() -> tuple[str, str]:
    user = required(MLFLOW_USER)
    return user, strong(MLFLOW_PASSWORD, user, required(MLFLOW_PASSWORD))
