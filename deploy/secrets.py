"""Credentials come from the environment only: never from params.yaml, never from the command line."""

from __future__ import annotations

import os

from fedtune.core.errors import InputError

PREFECT_AUTH = "FEDTUNE_PREFECT_AUTH"  # "user:password" the Prefect server demands (basic auth)
MLFLOW_USER, MLFLOW_PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


MIN_PASSWORD = 12  # characters; a guessable password on an open port is no auth
# the stems of the defaults and favourites that guessing starts with (MLflow's default admin password is password1234)
GUESSED = ("password", "changeme", "letmein", "qwerty", "123456", "admin", "secret123")
MIN_DISTINCT = 6  # characters; "aaaaaaaaaaaa" is 12 long and guessed first


class MissingSecret(InputError):
    pass


def strong(name: str, user: str, password: str) -> str:
    """`password`, refused (MissingSecret naming `name`) when it is short, has few distinct characters,
    contains the user name or a commonly guessed stem. A floor against the first guesses, not a
    strength meter: use a generated secret (`python -c "import secrets; print(secrets.token_urlsafe())"`)."""
    lowered = password.lower()
    if (
        len(password) < MIN_PASSWORD
        or len(set(password)) < MIN_DISTINCT
        or (user and user.lower() in lowered)
        or any(stem in lowered for stem in GUESSED)
    ):
        raise MissingSecret(
            f"{name}: the password is weak (under {MIN_PASSWORD} characters, under {MIN_DISTINCT} distinct ones, "
            "the user name or a commonly guessed word in it); the deployment recipe refuses to guard its servers "
            "with it"
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
