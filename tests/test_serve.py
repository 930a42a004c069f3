"""`fedtune serve`: the simulated federation as deployments a person starts from the Prefect UI,
with no work pool or worker, and the short form's fields reaching the run's config."""

from __future__ import annotations

import os
import time

import httpx
import yaml
from mlflow import MlflowClient

from fedtune.config.schema import build_config
from fedtune.core.catalog import PEFT_METHODS, STRATEGIES
from tests.conftest import BIN, measured, start_process, stop_process, tiny_overrides


def _deployment(url: str, name: str, log) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 300
    with httpx.Client(base_url=url, timeout=10) as api:  # one client: each new one loads the CA bundle
        while time.monotonic() < deadline:
            answer = api.get(f"/deployments/name/{name}")
            if answer.status_code == 200:
                return answer.json()
            time.sleep(1)
    raise AssertionError(f"{name} was not served: {log.read_text()[-3000:]}")


def test_the_quick_form_is_served_described_and_its_fields_reach_the_run(tmp_path, tiny_model_dir, prefect_api) -> None:  # type: ignore[no-untyped-def]
    from prefect.deployments import run_deployment

    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    overrides["federation"]["rounds"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(overrides))
    config = build_config(overrides)
    log = tmp_path / "serve.log"
    served = start_process(
        [str(BIN / "fedtune"), "serve", "-c", "params.yaml"], measured(dict(os.environ)), tmp_path, log
    )
    try:
        full = _deployment(prefect_api, "federated-finetune/simulated", log)
        assert full["parameters"]["config"]["federation"]["rounds"] == 2  # the whole config, as served
        quick = _deployment(prefect_api, "quick-run/simulated", log)
        schema = quick["parameter_openapi_schema"]["properties"]
        assert set(schema) == {
            "rounds",
            "clients_per_round",
            "strategy",
            "learning_rate",
            "steps_per_round",
            "peft_method",
            "params",
        }
        assert all(field.get("description") for field in schema.values()), schema
        assert (
            schema["strategy"]["enum"] == STRATEGIES.names() and schema["peft_method"]["enum"] == PEFT_METHODS.names()
        )
        assert quick["parameters"]["rounds"] == 2 and quick["parameters"]["learning_rate"] == config.train.lr

        run = run_deployment(
            "quick-run/simulated",
            parameters={"rounds": 1, "strategy": "fedprox", "learning_rate": 0.005},
            timeout=900,
            poll_interval=1,  # Prefect's default, 5 s, waits up to 4 s past the run's end
        )
        assert run.state is not None and run.state.is_completed(), (run.state, log.read_text()[-5000:])
    finally:
        stop_process(served)
    mlflow = MlflowClient(config.tracking.tracking_uri)
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    (found,) = mlflow.search_runs([experiment.experiment_id])
    assert found.data.params["federation.rounds"] == "1"
    assert found.data.params["federation.strategy"] == "fedprox" and found.data.params["train.lr"] == "0.005"
    assert found.info.status == "FINISHED"
