"""The coordinator SIGKILLed mid-round, then `fedtune run --resume`: the same adapters, bit for bit.

Every run is the real CLI in its own process (forked from tests/cli_launcher.py, which imported it
once), against one Prefect server for the module, each test with its own MLflow store.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from fedtune.core.faults import CRASH_AT
from fedtune.round.checkpoints import latest_checkpoint
from tests.conftest import migrated_mlflow_store, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = [0, 1, 2, 3]


class Launcher:
    """The launcher process (with the deadline on every reply) and the tiny model."""

    def __init__(self, env: dict[str, str], home: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cli_launcher", str(migrated_mlflow_store())],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(home / "launcher.log").open("wb"),
            start_new_session=True,  # its forks too, so teardown can end them all
        )
        self.buffer = b""
        self.model_dir = Path()

    def line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self.proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                raise TimeoutError(f"no reply from the CLI launcher within {timeout} s")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def params(self, root: Path) -> Path:
        """A tiny config writing under `root`, with its own MLflow store (`tiny_overrides`)."""
        root.mkdir(parents=True, exist_ok=True)
        path = root / "params.yaml"
        path.write_text(yaml.safe_dump(tiny_overrides(root, self.model_dir)))
        return path

    def run(self, params: Path, *args: str, crash: str = "", timeout: float = 240) -> tuple[int, str]:
        log = params.with_name(f"run-{crash or 'clean'}-{'-'.join(args) or 'fresh'}.log")
        request = {"args": ["run", "-c", str(params), *args], "env": {CRASH_AT: crash}, "log": str(log)}
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        code = int(self.line(timeout).removeprefix("exit "))
        return code, log.read_text()

    def close(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cli(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, prefect_api: str
) -> Iterator[Launcher]:
    """One CLI launcher for the module, on the session's Prefect server."""
    home = tmp_path_factory.mktemp("launcher")
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    launcher = Launcher(env, home)
    try:
        launcher.model_dir = request.getfixturevalue("tiny_model_dir")
        assert launcher.line(timeout=180) == "ready"
        yield launcher
    finally:
        launcher.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _adapters(root: Path) -> dict[str, str]:
    out = root / "outputs" / "federated"
    files = {p.parent.name: _sha(p) for p in sorted(out.glob("checkpoints/round_*/global.safetensors"))}
    if (out / "final_adapter.safetensors").exists():
        files["final"] = _sha(out / "final_adapter.safetensors")
    return files


def _metric_steps(root: Path) -> dict[str, list[int]]:
    """Every metric of the run with the steps it was logged at (a step twice = a round counted twice)."""
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("tests").experiment_id)
    return {key: [m.step for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics}


def _test_loss(root: Path) -> dict[int, float]:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("tests").experiment_id)
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, "test_loss")}


@pytest.fixture(scope="module")
def reference(cli: Launcher, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run that the crashed ones must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    code, log = cli.run(cli.params(root))
    assert code == 0, log
    return root


def _assert_matches_reference(root: Path, reference: Path) -> None:
    assert _adapters(root) == _adapters(reference)
    checkpoint = latest_checkpoint(root / "outputs" / "federated")
    assert checkpoint is not None and [row["round"] for row in checkpoint.history] == ROUNDS
    steps = _metric_steps(root)
    assert {key: Counter(s) for key, s in steps.items() if max(Counter(s).values()) > 1} == {}  # none twice
    assert sorted(steps["test_loss"]) == ROUNDS
    assert _test_loss(root) == _test_loss(reference)  # MLflow holds the same rounds, not earlier attempts


@pytest.mark.parametrize("point", ["training", "replies", "aggregation", "checkpoint"])
def test_a_coordinator_killed_in_round_2_resumes_to_the_same_adapters(
    point: str, cli: Launcher, reference: Path, tmp_path: Path
) -> None:
    params = cli.params(tmp_path)
    code, log = cli.run(params, crash=f"{point}:2")
    assert code == -signal.SIGKILL, log
    done = _adapters(tmp_path)
    assert done == {k: v for k, v in _adapters(reference).items() if k in ("round_0000", "round_0001")}
    assert sorted(_metric_steps(tmp_path)["test_loss"]) == [0, 1]  # round 2 is not logged before its checkpoint

    code, log = cli.run(params, "--resume")
    assert code == 0, log
    assert "resuming after round 1 of 3" in log
    _assert_matches_reference(tmp_path, reference)


def test_a_torn_checkpoint_is_skipped_and_its_round_recomputed(cli: Launcher, reference: Path, tmp_path: Path) -> None:
    params = cli.params(tmp_path)
    code, log = cli.run(params, crash="checkpoint:3")
    assert code == -signal.SIGKILL, log
    torn = tmp_path / "outputs" / "federated" / "checkpoints" / "round_0002" / "global.safetensors"
    with torn.open("r+b") as handle:  # a torn write on storage without atomic rename: cut short in place
        handle.truncate(torn.stat().st_size // 2)

    code, log = cli.run(params, "--resume")
    assert code == 0, log
    assert "skipping damaged checkpoint" in log and "round_0002" in log
    assert "resuming after round 1 of 3" in log
    _assert_matches_reference(tmp_path, reference)


def test_a_crash_point_kills_only_at_its_name_and_round() -> None:
    script = "from fedtune.core.faults import crash_point as at; at('aggregation', 1); at('replies', 2)"
    for target, code in (("aggregation:1", -signal.SIGKILL), ("replies:2", -signal.SIGKILL), ("replies:1", 0)):
        env = {**os.environ, CRASH_AT: target}
        assert subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, timeout=60).returncode == code, target


def test_a_round_logged_again_keeps_its_first_value_at_its_step(cli: Launcher, tmp_path: Path) -> None:
    from mlflow_tracking.runs import ROUND_STARTED, RunTracker

    shutil.copy(migrated_mlflow_store(), tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = RunTracker.start(
        tracking_uri=uri, experiment="t", artifact_location=str(tmp_path / "art"), run_name="r", params={}, tags={}
    )
    history = [
        {"round": r, "test_loss": 1.0 / (r + 1), "reports": [{"client": 0, "round": r, "train_loss": 0.5 + r}]}
        for r in range(3)
    ]
    for row in history[:2]:  # rounds 0 and 1 logged; the kill came after round 2's checkpoint, before its logging
        run.log_round(row["round"], row, row["reports"])
    run.log_rounds([(row["round"], row, row["reports"]) for row in history])  # the resumed run catching up
    run.log_round(2, {"round": 2, "test_loss": 9.0}, [])  # round 2 recomputed from an earlier checkpoint
    # a crash while round 3 was being sent: its start is marked and only part of it arrived
    run.set_tags({ROUND_STARTED: "3"})
    run.log_metrics({"test_loss": 0.25}, step=3)
    run.log_round(3, {"round": 3, "test_loss": 0.25}, [{"client": 0, "round": 3, "train_loss": 3.5}])
    client = MlflowClient(uri)
    for key, values in (("test_loss", [1.0, 0.5, 1.0 / 3, 0.25]), ("client_0/train_loss", [0.5, 1.5, 2.5, 3.5])):
        history_ = sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, key))
        assert history_ == list(enumerate(values)), key
