"""README commands run as written (with this environment's bin/ for `.venv/bin/`, from the
repository root), and their documented output checked."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.conftest import BIN, start_process, stop_process

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def _command(line: str) -> list[str]:
    return [
        str(BIN / word[len(".venv/bin/") :]) if word.startswith(".venv/bin/") else word for word in shlex.split(line)
    ]


def test_the_documented_check_prints_the_documented_errors() -> None:
    block = re.search(r"```text\n\$ (fedtune check .*?)\n(invalid config:\n.*?)```", README, re.S)
    assert block, "README shows a `fedtune check` with its output"
    command, shown = block.group(1).replace("\\\n", " "), block.group(2)
    done = subprocess.run(
        _command(".venv/bin/" + command), cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == shown


def test_the_documented_prefect_server_starts_without_an_error(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Offline, Prefect's telemetry fails with an ERROR line unless analytics are off; the project
    turns them off in pyproject.toml ([tool.prefect.server]), where the README's commands run."""
    from deploy.servers import free_port

    line = next(line for line in README.splitlines() if line.startswith(".venv/bin/prefect server start"))
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path), "PREFECT_SERVER_API_PORT": port}  # the command as written, a free port
    shown = subprocess.run(
        [str(BIN / "prefect"), "config", "view", "--show-sources"], cwd=ROOT, env=env, capture_output=True, text=True
    ).stdout
    assert "PREFECT_SERVER_ANALYTICS_ENABLED='False' (from pyproject.toml)" in shown, shown

    log = tmp_path / "server.log"
    server = start_process(_command(line.split("#")[0]), env, ROOT, log)
    try:
        started, healthy = time.monotonic(), False
        while not healthy and time.monotonic() - started < 120:
            assert server.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                healthy = True
            time.sleep(0.5)
        assert healthy, log.read_text()[-3000:]
        time.sleep(10)  # the services' first loops (telemetry's send among them) run at start
    finally:
        stop_process(server)
    text = log.read_text()
    assert "ERROR" not in text and "Traceback" not in text, text[-3000:]


def test_the_documented_snippet_loads_the_champion_adapter_without_fedtune(tmp_path, tiny_config) -> None:  # type: ignore[no-untyped-def]
    """The README's Python block, run as written (`python -c`) in a folder holding an MLflow store
    with a registered champion whose base model the config named by a path relative to the project."""
    import torch

    from fedtune.model.adapters import get_adapter_state
    from fedtune.model.builder import build_peft_model, export_adapter
    from mlflow_tracking.registry import register_if_better
    from mlflow_tracking.runs import RunTracker

    snippet = re.search(r"```python\n(import mlflow\n.*?)```", README, re.S)
    assert snippet, "README shows how to load the champion adapter"
    model_dir = Path(tiny_config.model.name_or_path)
    config = tiny_config.model_copy(
        update={"model": tiny_config.model.model_copy(update={"name_or_path": os.path.relpath(model_dir, ROOT)})}
    )
    state = {k: torch.full_like(v, 0.01) for k, v in get_adapter_state(build_peft_model(tiny_config)).items()}
    folder = export_adapter(config, state, tmp_path / "exported")  # as `fedtune run` does, from the project root
    run = RunTracker.start(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="fedtune",
        artifact_location=str(tmp_path / "mlartifacts"),
        run_name="federated",
        params={},
        tags={},
    )
    run.log_artifacts(folder, "adapters/final")
    tags = {"lineage.data.test": "md5", "round": "3", "base_model": str(model_dir), "peft_method": "lora"}
    assert register_if_better(run, "adapters/final", "fedtune-global-adapter", "champion", 1.0, tags, False)[0] == "1"
    check = (
        "\nfrom peft import get_peft_model_state_dict\n"
        "print(type(model).__name__, type(tokenizer).__name__, "
        "sorted({round(float(v.flatten()[0]), 4) for v in get_peft_model_state_dict(model).values()}))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(
        [str(BIN / "python"), "-c", snippet.group(1) + check],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == "PeftModelForCausalLM PreTrainedTokenizerFast [0.01]", done.stdout
