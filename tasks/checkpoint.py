"""Checkpoint step: persist everything a resumed run needs after each completed round."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedtune.model.adapters import load_state
from fedtune.round.checkpoints import Checkpoint, save_checkpoint


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, task_run_name="checkpoint-r{round_}")
def checkpoint(
    run_dir: str,
    round_: int,
    global_path: str,
    server_state_path: str,
    history: list[dict[str, Any]],
    meta: dict[str, Any],
) -> str:
    state = Checkpoint(round_, load_state(global_path), load_state(server_state_path), history, meta)
    return str(save_checkpoint(state, run_dir))
