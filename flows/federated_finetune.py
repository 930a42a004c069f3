"""Federated fine-tuning: R rounds of K sampled clients training PEFT adapters locally.

Every completed round is checkpointed (global adapter, strategy state, history, tracking run
id); `resume=True` continues from the last complete round and reproduces the uninterrupted
run, because client sampling and every client's seed are pure functions of (seed, round).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from fedtune.config.schema import FedConfig
from fedtune.core.atomic import atomic_write_bytes
from fedtune.core.faults import crash_point
from fedtune.core.sampling import sample_clients
from fedtune.deployment.exchange import round_namespace
from fedtune.model.adapters import load_state
from fedtune.privacy.record_dp import PrivacyBudgetExhausted
from fedtune.privacy.watermark import SECRET_FILE, owner_secret, verify
from fedtune.round.checkpoints import Checkpoint, checkpoint_dir, latest_checkpoint
from fedtune.round.outputs import clear_outputs, write_outputs
from fedtune.round.resume import (
    allowed_changes,
    check_data,
    check_source,
    data_version,
    same_data,
    source_version,
)
from flows.common import failing_run, prepare
from flows.remote_clients import train_remotely
from flows.reporting import advance, publish, start_progress
from flows.runners import task_runner
from tasks.aggregation import aggregate, round_allowed, share_view
from tasks.checkpoint import checkpoint as checkpoint_task
from tasks.evaluation import evaluate, evaluate_on_suites
from tasks.knowledge_transfer import co_tune_round
from tasks.model import initial_adapter
from tasks.tracking import finish_tracking, log_adapter, log_history, log_round, start_tracking, tracker
from tasks.training import local_train


def _start(config: FedConfig, run: Path, init_adapter: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Round 0: the initial adapter (fresh, or `init_adapter`), evaluated and checkpointed, and a new MLflow run."""
    for stale in ("checkpoints", "rounds"):
        shutil.rmtree(run / stale, ignore_errors=True)
    init = initial_adapter(config, str(_round_dir(run, 0)), init_adapter)
    run_id = start_tracking(config, "federated")
    tick = time.perf_counter()
    metrics = _evaluate_global(config, init["global_path"], 0)
    history = [{"round": 0, **metrics, "eval_seconds": time.perf_counter() - tick}]
    meta = {
        "mlflow_run_id": run_id,
        "config": config.model_dump(mode="json"),  # a resume is compared with it, field by field
        "data_version": None if config.deployment.enabled else data_version(config.data.partitions_dir),
        "source_version": None if config.deployment.enabled else source_version(config.data.source),
        "sizes": init,
    }
    checkpoint_task(str(run), 0, init["global_path"], init["server_state_path"], history, meta)
    log_round(config, run_id, 0, metrics, [], history)
    return history, meta


def _reopen(config: FedConfig, run: Path, done: Checkpoint, changes: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """A resume: the checkpoint's MLflow run reopened, tagged with the (safe) config changes and
    caught up on rounds checkpointed but not yet logged; the meta that later checkpoints carry."""
    meta = {**done.meta, "config": config.model_dump(mode="json")}
    changed = "; ".join(f"{path}: {old!r} -> {new!r}" for path, (old, new) in changes.items())
    tags = {f"resume.after_round_{done.round:04d}": changed or "no change"}
    start_tracking(config, "federated", resume_run_id=meta["mlflow_run_id"], resume_tags=tags)
    log_history(config, str(run), meta["mlflow_run_id"], list(done.history))
    return meta


def _evaluate_global(config: FedConfig, global_path: str | Path, round_: int, final: bool = False) -> dict[str, Any]:
    """The global adapter's test metrics (and, simulated, every client's validation loss on it), and
    the standard suites' scores on the rounds they are due and on the `final` adapter."""
    metrics = evaluate(config, str(global_path), f"round-{round_}", client_val=not config.deployment.enabled)
    every, last = config.eval.suites_every_rounds, config.federation.rounds
    if config.eval.suites and (final or round_ % every == 0 or round_ == last):
        metrics |= evaluate_on_suites(config, str(global_path), f"round-{round_}")
    return metrics


def _round_dir(run: Path, round_: int) -> Path:
    return run / "rounds" / f"round_{round_:04d}"


def _private_dir(run: Path, client: int) -> Path:
    """A client's own folder (its secret, its privacy ledger), which the server never reads."""
    return run / "clients" / f"client_{client}"


def _update_path(config: FedConfig, run: Path, round_: int, client: int) -> str:
    """Where a client keeps its update: the shared round folder, or with secure aggregation its
    private folder (the update leaves only as protocol messages)."""
    if config.secagg.enabled:
        return str(_private_dir(run, client) / f"round_{round_:04d}_update.safetensors")
    return str(_round_dir(run, round_) / f"update_client_{client}.safetensors")


def _watermarks(config: FedConfig, run: Path, global_path: str) -> dict[str, float]:
    """Each owner's bit-error rate in the new global (simulation: the owners' folders are here;
    in a deployment each owner verifies with its own key, `fedtune watermark-verify`)."""
    owners = [c for c in config.watermark.clients if (_private_dir(run, c) / SECRET_FILE).exists()]
    if not owners:
        return {}
    state = load_state(global_path)
    return {
        f"watermark/client_{c}/ber": float(verify(state, owner_secret(_private_dir(run, c)), config.watermark)["ber"])
        for c in owners
    }


def _train_here(
    config: FedConfig, run: Path, round_: int, clients: list[int], previous: Path, view: str
) -> tuple[list[dict[str, Any]], list[str], int]:
    """Simulation: the sampled clients train in this process's task runner, in waves."""
    reports, dropped, declined = [], [], 0
    width = config.federation.max_parallel_clients
    for wave in (clients[i : i + width] for i in range(0, len(clients), width)):
        futures = {
            c: local_train.submit(
                config, c, round_, str(previous), _update_path(config, run, round_, c), str(_private_dir(run, c)), view
            )
            for c in wave
        }
        deadline = time.monotonic() + config.federation.client_timeout_s  # the wave's clients run at once
        for client, future in futures.items():
            try:
                reports.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
                crash_point("replies", round_)
            except PrivacyBudgetExhausted as error:
                declined += 1
                dropped.append(str(error))
            except Exception as error:  # a lost client drops out; the aggregate step decides if enough remain
                dropped.append(f"client {client}: training failed ({type(error).__name__}: {error})")
    return reports, dropped, declined


def _round(
    config: FedConfig, run: Path, round_: int, run_id: str
) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """Sampled clients train in waves, the strategy aggregates, the new global is evaluated.

    None when too few clients can afford the round under their record-level privacy budgets."""
    tick = time.perf_counter()
    previous = checkpoint_dir(run, round_ - 1) / "global.safetensors"
    out = _round_dir(run, round_)
    n, k = config.data.partition.num_clients, config.federation.clients_per_round
    clients = sample_clients(n, k, config.federation.seed, round_)
    get_run_logger().info("round %d/%d: clients %s", round_, config.federation.rounds, clients)
    server_state = str(previous.with_name("server_state.safetensors"))
    view = share_view(config, server_state, str(out))  # what clients may see of it
    namespace = None
    if config.deployment.enabled:
        namespace = round_namespace(run_id, round_)
        reports, dropped = train_remotely(config, namespace, round_, clients, previous, Path(view), out)
        declined = 0
    else:
        reports, dropped, declined = _train_here(config, run, round_, clients, previous, view)
    if declined and len(reports) < config.federation.min_fit_clients:
        return None
    paths = aggregate(config, round_, str(previous), server_state, reports, str(out), dropped, namespace)
    cotuned = co_tune_round(config, str(run), round_, paths["global_path"]) if config.distill.server_model else {}
    marks = {} if config.deployment.enabled else _watermarks(config, run, paths["global_path"])
    eval_tick = time.perf_counter()
    due = round_ % config.eval.every_rounds == 0 or round_ == config.federation.rounds
    metrics = _evaluate_global(config, paths["global_path"], round_) if due else {}
    eval_seconds = time.perf_counter() - eval_tick
    row = {
        "round": round_,
        **metrics,
        "clients": clients,
        "clients_aggregated": len(clients) - len(paths["left_out"]),
        "clients_left_out": len(paths["left_out"]),
        "left_out": paths["left_out"],
        **paths["state_metrics"],
        **marks,
        **cotuned,
        "train_loss": sum(r["train_loss"] for r in reports) / max(len(reports), 1),
        "bytes_up": paths.get("protocol_bytes_up", sum(r["bytes_up"] for r in reports)),
        "bytes_up_per_client": paths.get("protocol_bytes_up", sum(r["bytes_up"] for r in reports))
        / max(len(reports), 1),
        "bytes_down": sum(r["bytes_down"] for r in reports),
        "examples": sum(r["num_examples"] for r in reports),
        "round_seconds": time.perf_counter() - tick,
        "eval_seconds": eval_seconds + sum(r["val_seconds"] for r in reports),
    }
    return row, reports


def _finish(
    config: FedConfig, run: Path, run_id: str, sizes: dict[str, Any], history: list[dict[str, Any]], started: float
) -> dict[str, Any]:
    """Summary, final adapter (logged, registered, copied), then the DVC outputs, last."""
    last = checkpoint_dir(run, history[-1]["round"]) / "global.safetensors"
    late: dict[str, Any] = {}
    if "test_loss" not in history[-1]:  # it stopped early, between two evaluations (eval.every_rounds)
        late = _evaluate_global(config, last, history[-1]["round"], final=True)
    elif config.eval.suites and not any(key.startswith("suite/") for key in history[-1]):  # stopped off the suites'
        late = evaluate_on_suites(config, str(last), f"round-{history[-1]['round']}")
    if late:
        tracker(config, run_id).log_new_metrics(late, step=history[-1]["round"])
        history[-1] = {**history[-1], **late}
    final = history[-1]
    per_client_up = final["bytes_up_per_client"]
    summary: dict[str, Any] = {
        "method": "federated",
        "rounds": final["round"],
        "stopped_early": final["round"] < config.federation.rounds,
        "test_loss": final["test_loss"],
        "test_accuracy": final.get("test_accuracy"),
        "bytes_up_per_client_round": per_client_up,
        "bytes_per_round": final["bytes_up"] + final["bytes_down"],
        "bytes_total": sum(row.get("bytes_up", 0) + row.get("bytes_down", 0) for row in history),
        "share_of_full_finetuning": per_client_up / sizes["full_update_bytes"],
        "adapter_parameters": sizes["adapter_parameters"],
        "wall_seconds": time.perf_counter() - started,
        "mlflow_run_id": run_id,
    }
    artifact = log_adapter(config, run_id, str(last), "adapters/final")
    summary["registered_version"] = finish_tracking(config, run_id, summary, register_artifact=artifact)
    atomic_write_bytes(last.read_bytes(), run / "final_adapter.safetensors")
    write_outputs(run, summary, history)
    return summary


@flow(name="federated-rounds")
def federated_rounds(
    config: FedConfig,
    run_dir: str,
    first: int,
    history: list[dict[str, Any]],
    meta: dict[str, Any],
    progress_id: str | None = None,
) -> list[dict[str, Any]]:
    """Rounds `first`..R, checkpointed one by one; returns the history extended with them.

    A subflow because its task runner (threads, a Dask or Ray cluster: `federation.runner`) comes
    from the config, which a flow started from the CLI or a deployment only knows once it runs."""
    logger = get_run_logger()
    run, run_id, history = Path(run_dir), meta["mlflow_run_id"], list(history)
    for round_ in range(first, config.federation.rounds + 1):
        if not round_allowed(config, round_, str(checkpoint_dir(run, round_ - 1) / "server_state.safetensors")):
            logger.warning("stopping before round %d: the strategy's budget would be exceeded", round_)
            break
        outcome = _round(config, run, round_, run_id)
        if outcome is None:
            logger.warning("stopping before round %d: too few clients can afford it (record_dp)", round_)
            break
        row, reports = outcome
        history.append({**row, "reports": reports})  # checkpointed with the round, for log_history
        out = _round_dir(run, round_)
        checkpoint_task(
            str(run), round_, str(out / "global.safetensors"), str(out / "server_state.safetensors"), history, meta
        )
        log_round(config, run_id, round_, row, reports, history)  # only a checkpointed round is logged
        log_adapter(config, run_id, str(out / "global.safetensors"), f"adapters/round_{round_:04d}")
        if progress_id is not None:
            advance(progress_id, row, config.federation.rounds)
    return history


@flow(name="federated-finetune")
def federated_finetune(
    config: FedConfig = FedConfig(),  # noqa: B008 (Prefect shows the defaults in the run form)
    resume: bool = False,
    prepare_data: bool = True,
    init_adapter: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) a simulated federation and return its summary.

    `init_adapter`, a peft adapter folder, is round 0's global instead of a fresh adapter (continual
    learning starts from the registry's champion); a resumed run keeps its own round 0."""
    logger = get_run_logger()
    started = time.perf_counter()
    run = Path(config.federation.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    done = latest_checkpoint(run) if resume else None
    changes = allowed_changes(done.meta, config.model_dump(mode="json"), done.round) if done else {}
    if done is not None:
        check_source(done.meta, config.data.source, done.round)
    checkpointed_data = done is not None and same_data(done.meta, config.data.partitions_dir)
    # deployed, the data is the clients'; resumed, the checkpointed rounds' partitions stay as they are
    prepare(config, data=prepare_data and not config.deployment.enabled and not checkpointed_data)
    if done is not None:
        check_data(done.meta, config.data.partitions_dir, done.round)
    clear_outputs(run)  # only once the input is known to be good: bad input deletes nothing
    if done is not None:
        logger.info("resuming after round %d of %d", done.round, config.federation.rounds)
        completed, history, meta = done.round, list(done.history), _reopen(config, run, done, changes)
    else:
        completed = 0
        history, meta = _start(config, run, init_adapter)
    run_id = meta["mlflow_run_id"]
    with failing_run(config, run_id):
        rounds = federated_rounds.with_options(task_runner=task_runner(config.federation))
        progress = start_progress(completed, config.federation.rounds)
        history = rounds(config, str(run), completed + 1, history, meta, progress)
        summary = _finish(config, run, run_id, meta["sizes"], history, started)
    publish(config, history, run_id)
    logger.info("federated: test accuracy %s, test loss %.4f", summary["test_accuracy"], summary["test_loss"])
    return summary
