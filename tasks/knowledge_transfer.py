"""The steps of a knowledge-transfer round (fedtune/knowledge_transfer.py) as Prefect tasks."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedtune import knowledge_transfer as kt
from fedtune.config import FedConfig
from fedtune.distillation import Target, TextExample


@task(cache_policy=NO_CACHE, task_run_name="private-r{round_}-c{client}")
def train_private(config: FedConfig, client: int, round_: int, private_dir: str) -> dict[str, Any]:
    return kt.train_private(kt.client_config(config, client), client, round_, private_dir)


@task(cache_policy=NO_CACHE, task_run_name="logits-r{round_}-c{client}")
def send_logits(
    config: FedConfig, client: int, round_: int, private_dir: str, texts: list[TextExample]
) -> list[dict[str, list]]:
    return kt.send_logits(kt.client_config(config, client), round_, private_dir, texts)


@task(cache_policy=NO_CACHE, task_run_name="fuse-for-{receiver}")
def fuse_for(
    config: FedConfig, receiver: int, messages: dict[int, list[dict[str, list]]], texts: list[TextExample]
) -> tuple[list[list[Target]], int]:
    return kt.fused_targets(config, receiver, messages, texts)


@task(cache_policy=NO_CACHE, task_run_name="distill-r{round_}-c{client}")
def distill(
    config: FedConfig, client: int, round_: int, private_dir: str, texts: list[TextExample], targets: list[list[Target]]
) -> dict[str, Any]:
    return kt.distill_public(kt.client_config(config, client), client, round_, private_dir, texts, targets)
