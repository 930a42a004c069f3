"""Continual learning on a real schedule: a served interval deployment under a real Prefect server
fires twice, and the second run continues from the adapter the first one registered."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow import MlflowClient

from fedtune.config.schema import build_config
from fedtune.data.partition import client_dir, split_path
from mlflow_tracking.lineage import dvc_md5
from tests.conftest import BIN, measured, start_process, stop_process, tiny_overrides

# No wall-clock budget for the whole wait (about 90 s idle, over 240 s with the rest of the suite on the
# same 2 cores): the test fails when the server's runs stop making progress (no new line from them in
# the serve log and no run changing state) for STALL_S, and gives up at CAP_S whatever happens.
STALL_S, CAP_S = 180.0, 1200.0


def _flow_runs(api: httpx.Client, deployment: str) -> list[dict]:
    """The continual-learning flow's runs of `deployment` that left the schedule (the session's server
    also holds others; the schedule holds up to a hundred future runs). One client for the whole
    wait: each new one loads the CA bundle, 30 ms of CPU."""
    query = {
        "flows": {"name": {"any_": ["continual-learning"]}},
        "deployments": {"name": {"any_": [deployment]}},
        "flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING", "COMPLETED", "FAILED", "CRASHED"]}}},
    }
    return api.post("/flow_runs/filter", json=query).json()


def test_an_interval_schedule_fires_twice_and_the_second_run_starts_from_the_first(  # type: ignore[no-untyped-def]
    tmp_path, tiny_model_dir, prefect_api
) -> None:
    url, name = prefect_api, "interval-test"
    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    overrides["federation"]["rounds"] = 2
    overrides["tracking"]["champion_alias"] = "best"  # the flow's alias follows the config's
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(overrides))
    config = build_config(overrides)

    serve_log = tmp_path / "serve.log"
    serve = start_process(
        [str(BIN / "fedtune"), "serve-continual", "-c", "params.yaml", "--interval", "4", "--name", name],
        measured(dict(os.environ)),
        tmp_path,
        serve_log,
    )
    api = httpx.Client(base_url=url, timeout=10)
    try:
        start = last_progress = time.monotonic()
        seen: tuple = ()
        while True:
            runs = _flow_runs(api, name)
            if len(completed := [r for r in runs if r["state_type"] == "COMPLETED"]) >= 2:
                break
            failed = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
            assert not failed and serve.poll() is None, serve_log.read_text()[-5000:]
            # what the served runs printed and their states; not the runner's notes that it skipped a run the
            # concurrency limit cancelled (one per interval, forever: they would hide a hung run)
            printed = sum("Aborted submission" not in line for line in serve_log.read_text().splitlines())
            progress = (printed, tuple(sorted((r["id"], r["state_type"]) for r in runs)))
            if progress != seen:
                seen, last_progress = progress, time.monotonic()
            now = time.monotonic()
            assert now - last_progress < STALL_S, f"no progress for {STALL_S:.0f} s: {serve_log.read_text()[-5000:]}"
            assert now - start < CAP_S, "two scheduled runs did not complete in time"
            time.sleep(1)
    finally:
        stop_process(serve)
        api.close()
    completed.sort(key=lambda r: r["start_time"])
    assert all(r["deployment_id"] and r["auto_scheduled"] for r in completed)  # fired by the schedule

    mlflow = MlflowClient(config.tracking.tracking_uri)
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    first, second = mlflow.search_runs(
        [experiment.experiment_id], "tags.`continual.decision` != ''", order_by=["attributes.start_time ASC"]
    )[:2]
    # the first run started fresh and, better than a fresh adapter, became the champion
    assert first.data.tags["lineage.parent_version"] == "none"
    assert first.data.tags["continual.decision"] == "promoted"
    name = config.tracking.registered_model
    registered = {v.run_id: v for v in mlflow.search_model_versions(f"name='{name}'")}
    parent = registered[first.info.run_id].version
    # the second run started from it: the champion's version, and round 0 scores exactly its adapter
    assert second.data.tags["lineage.parent_version"] == str(parent)
    assert second.data.tags["lineage.parent_run_id"] == first.info.run_id
    start = {m.step: m.value for m in mlflow.get_metric_history(second.info.run_id, "test_loss")}[0]
    assert start == pytest.approx(first.data.metrics["final/test_loss"], abs=1e-5)
    # registered only if better, with its lineage; the alias moved with it
    if second.data.tags["continual.decision"] == "promoted":
        assert float(second.data.tags["continual.test_loss"]) < start
        version = registered[second.info.run_id]
        assert version.tags["lineage.parent_version"] == str(parent)
    else:
        assert second.info.run_id not in registered
    champion = second if second.data.tags["continual.decision"] == "promoted" else first
    assert mlflow.get_model_version_by_alias(name, "best").run_id == champion.info.run_id
    # data versions: DVC's md5 of each client's partition folder and of the test set
    root = config.data.partitions_dir
    expected = {f"client_{c}": dvc_md5(client_dir(root, c)) for c in range(config.data.partition.num_clients)}
    expected["test"] = dvc_md5(split_path(root, None, "test"))
    for run in (first, second):
        assert {k: run.data.tags[f"lineage.data.{k}"] for k in expected} == expected
    assert registered[first.info.run_id].tags["lineage.data.test"] == expected["test"]


def test_a_candidate_no_better_than_its_start_is_not_registered(tmp_path: Path) -> None:
    from prefect.logging import disable_run_logger

    from mlflow_tracking.runs import RunTracker
    from tasks.continual import settle

    config = build_config(
        {"tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_location": str(tmp_path / "a")}}
    )
    run = RunTracker.start(
        tracking_uri=config.tracking.tracking_uri,
        experiment="tests",
        artifact_location=config.tracking.artifact_location,
        run_name="candidate",
        params={},
        tags={},
    )
    run.log_metrics({"test_loss": 0.5}, step=0)
    summary = {"mlflow_run_id": run.run_id, "test_loss": 0.5, "rounds": 2}  # a tie is not better
    champion = {"version": "4", "run_id": "parent-run", "adapter": str(tmp_path)}
    with disable_run_logger():
        outcome = settle.fn(config, "champion", summary, champion, {"test": "abc"})
    assert outcome["promoted"] is False and outcome["version"] is None
    tags = run.client.get_run(run.run_id).data.tags
    assert tags["continual.decision"] == "kept" and tags["lineage.parent_version"] == "4"
    assert tags["lineage.data.test"] == "abc"
    assert not run.client.search_registered_models()


def test_data_versions_are_the_md5_dvc_add_records(tmp_path: Path) -> None:
    from dvc.repo import Repo

    folder = tmp_path / "client_0"
    (folder / "nested").mkdir(parents=True)
    (folder / "train.jsonl").write_text('{"a": 1}\n')
    (folder / "nested" / "val.jsonl").write_text('{"b": 2}\n')
    repo = Repo.init(str(tmp_path), no_scm=True)
    repo.add(str(folder))
    recorded = yaml.safe_load((tmp_path / "client_0.dvc").read_text())["outs"][0]["md5"]
    assert dvc_md5(folder) == recorded and recorded.endswith(".dir")
