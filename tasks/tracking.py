"""Tracking steps: MLflow I/O, retried because the store may be a remote server."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from fedtune.config.schema import FedConfig
from fedtune.data.partition import split_path
from fedtune.model.adapters import load_state
from fedtune.model.builder import export_adapter
from fedtune.round.checkpoints import checkpoint_dir
from mlflow_tracking.lineage import dvc_md5
from mlflow_tracking.registry import register_if_better
from mlflow_tracking.runs import RunTracker


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3)
def start_tracking(
    config: FedConfig, kind: str, resume_run_id: str | None = None, resume_tags: dict[str, str] | None = None
) -> str:
    """Open (or reopen on resume, tagging it with `resume_tags`: what changed) the parent MLflow run; its id."""
    tracking = config.tracking
    tracker = RunTracker.start(
        tracking_uri=tracking.tracking_uri,
        experiment=tracking.experiment,
        artifact_location=tracking.artifact_location,
        run_name=f"{kind}-{flow_run.get_name() or 'local'}",
        params={"method": kind, **config.model_dump(mode="json")},  # the compare view's diff shows both
        tags={
            "fedtune.kind": kind,
            "prefect.flow_run_id": str(flow_run.get_id() or "none"),
            "prefect.flow_run_url": str(flow_run.get_flow_run_ui_url() or "none"),  # its page in the Prefect UI
            "config.fingerprint": config.fingerprint(),
        },
        resume_run_id=resume_run_id,
    )
    if resume_tags:
        tracker.set_tags(resume_tags)  # MLflow params are immutable: a change on resume is a tag
    if resume_run_id is None and not config.deployment.enabled:  # deployed, the data is the clients' only
        root = config.data.partitions_dir
        splits = {
            f"client_{c}/{split}": split_path(root, c, split)
            for c in range(config.data.partition.num_clients)
            for split in ("train", "val")
        }
        tracker.log_data_inputs({**splits, "test": split_path(root, None, "test")})
    return tracker.run_id


def tracker(config: FedConfig, run_id: str) -> RunTracker:
    return RunTracker(run_id, config.tracking.tracking_uri)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3, task_run_name="log-{artifact_path}")
def log_adapter(config: FedConfig, run_id: str, adapter_path: str, artifact_path: str) -> str:
    """Log an adapter in peft's save format (loadable with `PeftModel.from_pretrained`)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_adapter(config, load_state(adapter_path), Path(tmp) / "adapter")
        return tracker(config, run_id).log_artifacts(folder, artifact_path)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3, task_run_name="log-round-{round_}")
def log_round(
    config: FedConfig,
    run_id: str,
    round_: int,
    metrics: dict[str, Any],
    reports: list[dict[str, Any]],
    history: list[dict[str, Any]],
) -> None:
    run = tracker(config, run_id)
    run.log_round(round_, metrics, reports)
    run.log_round_plot(history)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3)
def log_history(config: FedConfig, run_dir: str, run_id: str, history: list[dict[str, Any]]) -> None:
    """On resume: log what the run lacks of the checkpointed rounds (a round is logged only once its
    checkpoint exists, so a kill in between leaves it unlogged), metrics and adapters alike."""
    run = tracker(config, run_id)
    run.log_rounds([(row["round"], row, row.get("reports", [])) for row in history])
    have = run.artifact_paths("adapters")
    for row in history[1:]:
        artifact = f"adapters/round_{row['round']:04d}"
        if artifact not in have:
            log_adapter.fn(config, run_id, str(checkpoint_dir(run_dir, row["round"]) / "global.safetensors"), artifact)
    run.log_round_plot(history)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3)
def fail_tracking(config: FedConfig, run_id: str) -> None:
    """Mark the run FAILED, so an interrupted run never looks complete in MLflow."""
    tracker(config, run_id).finish("FAILED")


# the core metrics every method's summary has, under the same names (MLflow: final/<name>)
RESULT_COLUMNS = ("test_accuracy", "test_loss", "bytes_per_round", "bytes_total", "wall_seconds")


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3)
def finish_tracking(
    config: FedConfig, run_id: str, summary: dict[str, Any], register_artifact: str | None = None
) -> str | None:
    """Log the summary, register the final adapter (when given, as `tracking.register_final` says:
    by default only if it beats the `tracking.champion_alias` version on the same test set), close
    the run; idempotent, so finishing a run again (`--resume` of a finished run) adds nothing."""
    run = tracker(config, run_id)
    last = int(summary.get("rounds") or 0)  # at the last round, so a run extended on resume logs its new end
    run.log_new_metrics({f"final/{k}": v for k, v in summary.items()}, step=last)  # non-numeric values skipped
    run.log_dict(summary, "summary.json")
    run.log_results_row(
        {
            "method": summary["method"],
            "strategy": config.federation.strategy if summary["method"] == "federated" else None,
            "peft": config.peft.method,
            **{key: summary.get(key) for key in RESULT_COLUMNS},
        }
    )
    version = None
    if register_artifact is not None and config.tracking.register_final != "never":
        test = split_path(config.data.partitions_dir, None, "test")
        tags = {
            "config": config.fingerprint(),
            "round": str(last),
            "lineage.data.test": dvc_md5(test) if test.exists() else "unknown",
            "base_model": config.model.name_or_path,
            "peft_method": config.peft.method,
        }
        if summary.get("test_accuracy") is not None:
            tags["test_accuracy"] = f"{summary['test_accuracy']:.6f}"
        version, decision = register_if_better(
            run,
            register_artifact,
            config.tracking.registered_model,
            config.tracking.champion_alias,
            summary["test_loss"],
            tags,
            always=config.tracking.register_final == "always",
        )
        run.set_tags({"registry.decision": decision})
        get_run_logger().info("model registry: %s", decision)
    run.finish()
    return version
