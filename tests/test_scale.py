"""Simulation at scale: 50 clients in a round, and client trainings on a Dask cluster."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import weakref
from pathlib import Path

import pytest
import torch
from distributed import Client, LocalCluster, get_task_stream
from mlflow import MlflowClient

import tasks.training
from fedtune.config.schema import ConfigError, build_config
from fedtune.data.partition import read_split
from fedtune.model.adapters import load_state
from fedtune.round.envelope import UpdateValidator
from flows.cli import app
from flows.federated_finetune import federated_finetune
from tests.conftest import tiny_overrides


def _one_round(root: Path, model_dir: Path, **federation: object):  # type: ignore[no-untyped-def]
    overrides = tiny_overrides(root, model_dir)
    overrides["federation"] |= {"rounds": 1, **federation}
    overrides["train"] |= {"steps_per_round": 2}
    overrides["eval"] |= {"generation_samples": 0}
    return overrides


def test_fifty_clients_aggregate_to_the_example_weighted_mean_one_update_at_a_time(
    tmp_path, tiny_model_dir, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    overrides = _one_round(tmp_path, tiny_model_dir, clients_per_round=50, max_parallel_clients=2)
    overrides["train"] |= {"steps_per_round": 1}
    overrides["data"]["synthetic"]["examples_per_skill"] = 120
    overrides["data"]["partition"] |= {"num_clients": 50, "scheme": "quantity_skew", "min_partition_size": 5}
    config = build_config(overrides)

    alive: list[weakref.ref[torch.Tensor]] = []
    most_alive = 0
    real_check = UpdateValidator.check

    def tracked_check(self, client, path, num_examples):  # type: ignore[no-untyped-def]
        nonlocal most_alive
        most_alive = max(most_alive, sum(ref() is not None for ref in alive))  # earlier updates still held
        state = real_check(self, client, path, num_examples)
        alive.append(weakref.ref(next(iter(state.values()))))
        return state

    monkeypatch.setattr(UpdateValidator, "check", tracked_check)
    federated_finetune(config=config)
    assert len(alive) == 50 and most_alive <= 2  # a running sum: not one held update per client

    out = Path(config.federation.output_dir)
    before = load_state(out / "checkpoints" / "round_0000" / "global.safetensors")
    after = load_state(out / "final_adapter.safetensors")
    updates = [load_state(out / "rounds" / "round_0001" / f"update_client_{c}.safetensors") for c in range(50)]
    examples = [len(read_split(config.data.partitions_dir, c, "train")) for c in range(50)]
    assert len(set(examples)) > 1  # quantity skew: weighting by examples matters

    def mean(weights: list[int]) -> dict[str, torch.Tensor]:  # in float64; the run's global is float32
        return {
            key: start.double() + sum(w * u[key].double() for w, u in zip(weights, updates, strict=True)) / sum(weights)
            for key, start in before.items()
        }

    def equal(expected: dict[str, torch.Tensor]) -> bool:  # up to the float32 rounding of the global
        return all(torch.allclose(after[key].double(), expected[key], rtol=1e-6, atol=1e-7) for key in after)

    assert equal(mean(examples))
    assert not equal(mean([1] * len(updates)))  # an unweighted mean would not pass


TWO_CLIENTS = {"clients_per_round": 2, "max_parallel_clients": 2}
# on Dask one worker process: it trains both clients, each worker costs seconds of imports to start
ONE_DASK_WORKER = {"clients_per_round": 2, "max_parallel_clients": 1}


def _adapter_hash(config) -> str:  # type: ignore[no-untyped-def]
    return hashlib.sha256((Path(config.federation.output_dir) / "final_adapter.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def threads_adapter(tmp_path_factory, tiny_model_dir) -> str:  # type: ignore[no-untyped-def]
    """SHA-256 of the global adapter of a 2-client round trained in threads.

    Runs on Dask must give the same bytes, not merely close values: the same seeds, partitions and
    round-0 adapter, and each client's training is a pure function of them wherever it runs.
    (Dask workers run torch with one thread, OMP_NUM_THREADS=1; the tiny model's kernels sum in
    the same order with one thread or two, which a large model on another CPU need not.)"""
    config = build_config(_one_round(tmp_path_factory.mktemp("threads"), tiny_model_dir, **TWO_CLIENTS))
    federated_finetune(config=config)
    return _adapter_hash(config)


def test_dask_runner_on_a_local_cluster_trains_outside_this_process_and_matches_threads(
    threads_adapter, tmp_path, tiny_model_dir, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    coordinator, real = os.getpid(), tasks.training.train_client

    def only_elsewhere(*args, **kwargs):  # type: ignore[no-untyped-def]
        if os.getpid() == coordinator:
            raise RuntimeError("a client trained in the coordinator's process")
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks.training, "train_client", only_elsewhere)  # shipped to the workers with the task
    config = build_config(_one_round(tmp_path, tiny_model_dir, **ONE_DASK_WORKER, runner="dask"))
    summary = federated_finetune(config=config)
    client = MlflowClient(config.tracking.tracking_uri)
    assert client.get_run(summary["mlflow_run_id"]).data.metrics["clients_aggregated"] == 2
    assert _adapter_hash(config) == threads_adapter


def test_dask_runner_at_a_cluster_address_runs_the_trainings_on_its_workers(
    threads_adapter, tmp_path, tiny_model_dir
) -> None:  # type: ignore[no-untyped-def]
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        runner = {"runner": "dask", "cluster_address": cluster.scheduler_address}
        config = build_config(_one_round(tmp_path, tiny_model_dir, **ONE_DASK_WORKER, **runner))
        with get_task_stream(client) as stream:
            federated_finetune(config=config)
        workers = set(client.scheduler_info()["workers"])
    trained = [t for t in stream.data if t["key"].startswith("local_train")]
    assert len(trained) == 2 and {t["worker"] for t in trained} <= workers
    assert _adapter_hash(config) == threads_adapter


def test_ray_without_prefect_ray_is_refused_before_any_work(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    if importlib.util.find_spec("prefect_ray") is not None:
        pytest.skip("prefect-ray is installed")
    from typer.testing import CliRunner

    result = CliRunner().invoke(
        app,
        [
            "run",
            "-s",
            "federation.runner=ray",
            "-s",
            f"model.name_or_path={tiny_model_dir}",
            "-s",
            "model.source=null",
            "-s",
            f"federation.output_dir={tmp_path}/out",
        ],
        terminal_width=200,
    )
    assert result.exit_code == 2
    assert "federation.runner: 'ray' needs prefect-ray" in result.output and "pip install prefect-ray" in result.output
    assert not (tmp_path / "out").exists()


def test_a_cluster_address_needs_a_cluster_runner() -> None:
    with pytest.raises(ConfigError, match="federation.cluster_address: .* set federation.runner to dask or ray"):
        build_config({"federation": {"cluster_address": "tcp://127.0.0.1:8786"}})
