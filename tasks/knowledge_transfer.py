"""The steps of a knowledge-transfer round (fedtune/hetero/knowledge_transfer.py) as Prefect tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedtune.config.schema import FedConfig
from fedtune.hetero import knowledge_transfer as kt
from fedtune.hetero.cotuning import co_tune, server_config
from fedtune.model.adapters import load_state, save_state
from fedtune.training.assessment import evaluate_adapter
from fedtune.training.distillation import Target, TextExample


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


@task(cache_policy=NO_CACHE, task_run_name="co-tune-r{round_}")
def co_tune_round(config: FedConfig, run_dir: str, round_: int, global_path: str) -> dict[str, float]:
    """FedCoLLM's server step: the aggregated adapter is replaced by its co-tuned version; the
    server model's adapter, saved in the run's server folder, is evaluated too."""
    server_dir = Path(run_dir) / "server"
    state, metrics = co_tune(config, load_state(global_path), server_dir, round_)
    save_state(state, global_path)
    large = server_dir / "server_adapter" / f"round_{round_:04d}.safetensors"
    scores = evaluate_adapter(server_config(config), str(large), generation=False, client_val=False)
    return {**metrics, "server/test_loss": scores["test_loss"]}
