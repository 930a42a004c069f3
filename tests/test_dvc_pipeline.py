"""The DVC pipeline end to end on tiny params, in a temporary git repository."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import tiny_overrides

ROOT = Path(__file__).parents[1]


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def test_dvc_repro_and_exp_run(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("fedtune", "flows", "tasks", "mlflow_tracking"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "fedtune", repo / "scripts" / "fedtune")
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(ROOT / "data" / "ag_news", repo / "data" / "ag_news")  # the default source, the first input
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), tiny_overrides(Path("."), tiny_model_dir))
    params["data"]["max_examples"] = 120
    params["model"].update({"name_or_path": "models/tiny", "source": str(tiny_model_dir)})
    params["data"].update({"processed_path": "data/processed/dataset.jsonl", "partitions_dir": "data/partitions"})
    params["federation"]["output_dir"] = "outputs/federated"
    params["tracking"].update({"tracking_uri": "sqlite:///mlflow.db", "artifact_location": "mlartifacts"})
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / ".gitignore").write_text("mlflow.db\nmlartifacts/\noutputs/federated/rounds/\n")

    # as a user who types .venv/bin/dvc without activating .venv: PATH has no fedtune of this
    # environment, only another one's (a decoy that fails), so each stage must find its own
    decoy = tmp_path / "other-env"
    decoy.mkdir()
    (decoy / "fedtune").write_text("#!/bin/sh\necho 'the fedtune on PATH ran' >&2\nexit 3\n")
    (decoy / "fedtune").chmod(0o755)
    bin_dir = str(Path(sys.executable).parent)
    path = [decoy, *(p for p in os.environ["PATH"].split(os.pathsep) if p != bin_dir)]
    env = {**os.environ, "PATH": os.pathsep.join(map(str, path)), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("VIRTUAL_ENV", None)
    dvc = str(Path(bin_dir) / "dvc")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run(["git", "init", "-q"], repo, env)
    _run([dvc, "init", "-q"], repo, env)
    _run([*git, "add", "-A"], repo, env)
    _run([*git, "commit", "-qm", "pipeline"], repo, env)

    _run([dvc, "repro"], repo, env)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"base_model", "prepare_data", "partition", "train", "evaluate"}
    metrics = json.loads((repo / "outputs" / "federated" / "metrics.json").read_text())
    assert metrics["rounds"] == 3 and metrics["test_loss"] > 0
    evaluation = json.loads((repo / "metrics" / "eval.json").read_text())
    assert evaluation["test_loss"] == metrics["test_loss"]
    assert (repo / "models" / "tiny" / "model.safetensors").exists()
    assert _run([dvc, "status", "--json"], repo, env).strip() in ("{}", "")
    # every parameter group and code folder a stage reads is declared: changing one makes it stale
    # (asked of DVC's API in this process: what `dvc status` prints, without 12 more interpreters)
    from dvc.repo import Repo

    pipeline = Repo(str(repo))
    for change, stage in (
        ({"secagg": {"enabled": True}}, "train"),
        ({"compression": {"method": "int8"}}, "train"),
        ({"record_dp": {"enabled": True}}, "train"),
        ({"data": {"truncation": "drop"}}, "partition"),
        ({"data": {"encoding": "latin-1"}}, "prepare_data"),
        ({"data": {"instruction_template": "{instruction}?"}}, "prepare_data"),
        ("data/ag_news/ag_news_topics.csv", "prepare_data"),
        ("fedtune/round/client.py", "train"),
        ("fedtune/model/loading.py", "base_model"),
        ("fedtune/training/objectives.py", "partition"),
        ("tasks/training.py", "train"),
        ("mlflow_tracking/runs.py", "train"),
    ):
        path = repo / (change if isinstance(change, str) else "params.yaml")
        kept = path.read_bytes()
        if isinstance(change, str):
            path.write_bytes(kept + b"\n# changed\n")
        else:
            path.write_text(yaml.safe_dump(_merge(yaml.safe_load(kept), change)))
        stale = {name.rsplit(":", 1)[-1]: why for name, why in pipeline.status().items()}  # "dvc.yaml:train"
        path.write_bytes(kept)
        assert stage in stale, (change, stale)
    pipeline.close()

    _run([*git, "add", "-A"], repo, env)
    _run([*git, "commit", "-qm", "results"], repo, env)
    _run([dvc, "exp", "run", "-S", "federation.rounds=2"], repo, env)
    metrics = json.loads((repo / "outputs" / "federated" / "metrics.json").read_text())
    assert metrics["rounds"] == 2
    shown = json.loads(_run([dvc, "exp", "show", "--json"], repo, env))
    assert shown, "dvc exp show lists the experiment"
    # the README's narrow view: the headline metrics and the varied parameters, not all of params.yaml
    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if x.startswith(".venv/bin/dvc exp show"))
    table = _run([dvc, *shlex.split(line)[1:]], repo, env)
    header = next(x for x in table.splitlines() if "Experiment" in x)
    for column in ("test_accuracy", "test_loss", "bytes_total", "federation.rounds", "train.lr"):
        assert column in table, (column, table)
    assert "max_length" not in table and "Created" not in header, table
