"""Evaluation step: the same measurements for every method's adapter."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fedtune.config.schema import FedConfig
from fedtune.training.assessment import evaluate_adapter


@task(cache_policy=NO_CACHE, task_run_name="evaluate-{label}")
def evaluate(config: FedConfig, adapter_path: str, label: str, client_val: bool = True) -> dict[str, Any]:
    """Flat numeric metrics (per-label accuracy as `test_accuracy/<label>`) plus a few samples."""
    metrics = evaluate_adapter(config, adapter_path, client_val=client_val)
    flat: dict[str, Any] = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    for label_name, value in metrics.get("test_accuracy_per_label", {}).items():
        flat[f"test_accuracy/{label_name}"] = value
    for client, value in enumerate(metrics.get("client_val_loss", [])):
        flat[f"client_{client}/global_val_loss"] = value
    get_run_logger().info(
        "%s: test loss %.4f, accuracy %s, samples %s",
        label,
        flat["test_loss"],
        flat.get("test_accuracy"),
        metrics.get("samples", [])[:3],
    )
    return flat


@task(cache_policy=NO_CACHE, task_run_name="suites-{label}")
def evaluate_on_suites(config: FedConfig, adapter_path: str, label: str) -> dict[str, float]:
    """The configured standard suites' scores as `suite/<name>/<metric>` and `suite/<name>/stderr`
    (MLflow metric names: pass@1 is logged as pass_at_1)."""
    from fedtune.training.suites import evaluate_suites

    flat: dict[str, float] = {}
    for name, scored in evaluate_suites(
        config, adapter_path, {str(k): v for k, v in config.eval.suites.items()}
    ).items():
        flat[f"suite/{name}/{scored['metric'].replace('@', '_at_')}"] = scored["score"]
        if scored["stderr"] is not None:
            flat[f"suite/{name}/stderr"] = scored["stderr"]
    get_run_logger().info("%s: suites %s", label, flat)
    return flat
