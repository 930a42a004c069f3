"""Bad input ends a command with one clear message naming the field, before any work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import measured

runner = CliRunner()


def _invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), terminal_width=200)


def test_invalid_config_lists_every_problem_with_its_path() -> None:
    result = _invoke(
        "run",
        "-s",
        "federation.rounds=0",
        "-s",
        "federation.clients_per_round=2",
        "-s",
        "data.partition.num_clients=1",
        "-s",
        "federation.strategy=fedadgrad",
        "-s",
        "peft.method=lorax",
    )
    assert result.exit_code == 2
    for text in ("federation.rounds", "federation.strategy", "peft.method", "unknown strategy 'fedadgrad'"):
        assert text in result.output
    result = _invoke("run", "-c", "missing.yaml")
    assert result.exit_code == 2 and "missing.yaml does not exist" in result.output


def test_clients_per_round_above_clients() -> None:
    result = _invoke("run", "-s", "federation.clients_per_round=5")
    assert result.exit_code == 2 and "exceeds data.partition.num_clients" in result.output


def test_missing_model_path_is_named_before_anything_runs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = _invoke(
        "run",
        "-s",
        f"model.name_or_path={tmp_path}/nope",
        "-s",
        "model.source=null",
        "-s",
        f"federation.output_dir={tmp_path}/out",
    )
    assert result.exit_code == 2
    assert "model.name_or_path" in result.output and "does not exist" in result.output
    assert not (tmp_path / "out").exists()


def test_data_without_the_mapped_columns(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "p", "completion": "c"}) for _ in range(5)))
    result = _invoke("prepare-data", "-s", f"data.source={data}", "-s", f"data.processed_path={tmp_path}/out.jsonl")
    assert result.exit_code == 2
    assert "data.columns.instruction" in result.output and not (tmp_path / "out.jsonl").exists()


def test_empty_client_partition(tmp_path) -> None:  # type: ignore[no-untyped-def]
    common = [
        "-s",
        "data.source=synthetic",
        "-s",
        f"data.processed_path={tmp_path}/d.jsonl",
        "-s",
        "data.synthetic.examples_per_skill=2",
        "-s",
        f"data.partitions_dir={tmp_path}/parts",
    ]
    assert _invoke("prepare-data", *common).exit_code == 0
    result = _invoke("partition", *common, "-s", "data.partition.num_clients=8", "-s", "federation.clients_per_round=1")
    assert result.exit_code == 2
    assert "data.partition" in result.output and not (tmp_path / "parts").exists()


def test_check_prints_every_problem_and_exits_2() -> None:
    root = Path(__file__).parents[1]
    overrides = ["federation.rounds=0", "federation.clients_per_round=9", "train.grad_accum=2", "record_dp.enabled=1"]
    command = [sys.executable, "-m", "flows.cli", "check", *[a for o in overrides for a in ("-s", o)]]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    assert done.returncode == 2, done.stdout + done.stderr
    for path in ("federation.rounds:", "federation.clients_per_round:", "train.grad_accum:"):
        assert path in done.stdout
    ok = subprocess.run([sys.executable, "-m", "flows.cli", "check"], cwd=root, capture_output=True)
    assert ok.returncode == 0 and b"config ok" in ok.stdout


def test_check_prints_messages_as_plain_text_and_survives_odd_values(tmp_path: Path) -> None:
    """Review findings: '[...]' in a message was read as Rich markup (text lost, or a MarkupError);
    Krum's f=.inf raised OverflowError; a YAML date broke the loader; a folder as -c crashed."""
    root = Path(__file__).parents[1]
    dated = tmp_path / "dated.yaml"
    dated.write_text("tracking:\n  experiment: 2024-01-01\n")
    cases = [
        (["-s", "peft.target_modules=[/q_proj"], "line 1, column"),
        (["-s", "federation.strategy=krum", "-s", "federation.strategy_options={f: .inf}"], "f=inf: every option"),
        (["-c", str(dated)], "tracking.experiment"),
        (["-c", str(tmp_path)], "is a directory"),
    ]
    for args, expected in cases:
        done = subprocess.run(
            [sys.executable, "-m", "flows.cli", "check", *args], cwd=root, capture_output=True, text=True
        )
        assert done.returncode == 2 and expected in done.stdout, (args, done.stdout, done.stderr[-500:])


def test_the_documented_deploy_up_command_is_parsed_and_checks_its_credentials_first() -> None:
    """rel-15: `python -m deploy up` was refused ("unexpected extra argument (up)") because a
    Typer app with one command and no callback has no subcommand names."""
    root = Path(__file__).parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("FEDTUNE_PREFECT_AUTH", "MLFLOW_TRACKING_PASSWORD")}
    done = subprocess.run(
        [sys.executable, "-m", "deploy", "up"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "FEDTUNE_PREFECT_AUTH is not set" in done.stdout + done.stderr, done.stderr[-800:]


@pytest.mark.parametrize(
    ("prefect", "mlflow_password", "named"),
    [
        ("admin:", "a-long-mlflow-secret", "FEDTUNE_PREFECT_AUTH"),  # empty password
        ("admin:short", "a-long-mlflow-secret", "FEDTUNE_PREFECT_AUTH"),
        ("admin:a-long-prefect-secret", "password1234", "MLFLOW_TRACKING_PASSWORD"),  # MLflow's default admin
        ("admin:aaaaaaaaaaaaaaaa", "a-long-mlflow-secret", "FEDTUNE_PREFECT_AUTH"),
        ("admin:adminadminadmin", "a-long-mlflow-secret", "FEDTUNE_PREFECT_AUTH"),
        ("admin:changeme1234", "a-long-mlflow-secret", "FEDTUNE_PREFECT_AUTH"),
    ],
)
def test_weak_deployment_passwords_are_refused_before_any_server_starts(prefect, mlflow_password, named) -> None:  # type: ignore[no-untyped-def]
    from deploy.secrets import MissingSecret, mlflow_credentials, prefect_auth

    env = {
        "FEDTUNE_PREFECT_AUTH": prefect,
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": mlflow_password,
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        with pytest.raises(MissingSecret, match=f"{named}: the password is weak"):
            prefect_auth()
            mlflow_credentials()


def test_the_demo_table_fits_an_80_column_terminal_with_nothing_cut(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from rich.console import Console

    import flows.cli as cli
    from fedtune.config.schema import build_config

    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"messages": [], "label": "x"}) + "\n" for _ in range(100)))
    config = build_config({"data": {"partitions_dir": str(tmp_path)}, "eval": {"generation_samples": 100}})
    shown = Console(width=80, record=True)
    monkeypatch.setattr(cli, "console", shown)
    row = {"test_loss": 0.2708, "wall_seconds": 228.2}
    cli.print_results(
        [
            {
                "method": "federated",
                "test_accuracy": 0.75,
                "bytes_per_round": 11152824,
                "share_of_full_finetuning": 0.00345,
                **row,
            },
            {"method": "local_only", "test_accuracy": 0.51, **row},
            {"method": "centralized", "test_accuracy": 0.82, **row},
        ],
        config,
    )
    text = shown.export_text()
    for cell in (
        "accuracy over 100 rows",
        "local_only",
        "centralized",
        "11,152,824",
        "0.345%",
        "0.043",
        "0.050",
        "wall s",
        "228",
    ):
        assert cell in text, text
    assert "…" not in text and max(map(len, text.splitlines())) <= 80, text


RUN_OF_MANY_TASKS = """
import os
import sys
os.environ.pop("COVERAGE_PROCESS_CONFIG", None)  # measure this script, not the temporary server it starts
from prefect import flow, task
from flows.local_server import run_recorded

@task
def square(i):
    return i * i

@flow
def many(n):
    return sum(square.map(range(n)).result())

print("result", run_recorded(many, n=int(sys.argv[1])))
"""


def test_a_command_exits_only_once_the_temporary_server_has_recorded_every_task_run(tmp_path: Path) -> None:
    """Without PREFECT_API_URL a command's runs go to Prefect's temporary server, stopped at exit; stopped while
    its recorder is behind (150 task runs were enough: 40 lost, ERROR tracebacks), it loses the last task runs."""
    import sqlite3

    n = 150
    env = measured({k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"})
    env |= {"PREFECT_HOME": str(tmp_path), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"  # Prefect's 20 s ran out in a loaded CI
    run = subprocess.run(
        [sys.executable, "-c", RUN_OF_MANY_TASKS, str(n)], env=env, capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr
    assert f"result {sum(i * i for i in range(n))}" in run.stdout
    assert "Starting temporary server" in run.stderr  # the case under test, not a running server
    assert "ERROR" not in run.stderr and "Traceback" not in run.stderr, run.stderr
    with sqlite3.connect(tmp_path / "prefect.db") as db:
        states = db.execute("select state_type, count(*) from task_run where name like 'square-%' group by 1")
        assert states.fetchall() == [("COMPLETED", n)]


def test_a_task_left_not_ready_by_a_failed_upstream_counts_as_recorded() -> None:
    """Prefect leaves such a task Pending "NotReady" for good: waiting for a final state would hang to the timeout."""
    from prefect.client.schemas.objects import StateType

    from flows.local_server import _settled

    assert _settled(StateType.PENDING, "NotReady") and _settled(StateType.CRASHED, "Crashed")
    assert not _settled(StateType.PENDING, "Pending") and not _settled(StateType.RUNNING, "Running")
