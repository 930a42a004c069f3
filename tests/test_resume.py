"""Resume means the same run (issue 13, kind 7): which config changes a checkpoint accepts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedtune.config.schema import FedConfig, build_config
from fedtune.round.checkpoints import Checkpoint, save_checkpoint
from fedtune.round.resume import (
    SAFE_ON_RESUME,
    ResumeRefused,
    allowed_changes,
    check_resume,
    data_version,
    source_version,
)


def _meta(config: FedConfig) -> dict:
    return {"config": config.model_dump(mode="json")}


def test_every_field_that_shapes_the_computation_is_named_with_both_values() -> None:
    checkpointed = build_config({"train": {"lr": 0.002}})
    resumed = build_config(
        {"train": {"lr": 0.05}, "data": {"partition": {"seed": 7}}, "peft": {"r": 16}, "federation": {"rounds": 9}}
    )
    with pytest.raises(ResumeRefused) as refused:
        allowed_changes(_meta(checkpointed), resumed.model_dump(mode="json"), completed=1)
    message = str(refused.value)
    for line in (
        "train.lr: 0.002 in the checkpoint, 0.05 now",
        "data.partition.seed: 42 in the checkpoint, 7 now",
        "peft.r: 8 in the checkpoint, 16 now",
    ):
        assert line in message
    assert "federation.rounds: 3 in" not in message  # safe: not among the refusals


def test_a_checkpoint_from_before_a_new_evaluation_field_still_resumes() -> None:
    """eval.every_rounds came after runs were checkpointed; it decides what is evaluated, not trained."""
    old = build_config({}).model_dump(mode="json")
    del old["eval"]["every_rounds"]
    changes = allowed_changes({"config": old}, build_config({}).model_dump(mode="json"), completed=2)
    assert changes == {"eval.every_rounds": (None, 1)}


def test_more_rounds_and_where_clients_run_may_change_and_are_returned() -> None:
    checkpointed = build_config({})
    resumed = build_config({"federation": {"rounds": 6, "client_timeout_s": 30, "max_parallel_clients": 3}})
    changes = allowed_changes(_meta(checkpointed), resumed.model_dump(mode="json"), completed=2)
    assert changes == {
        "federation.rounds": (3, 6),
        "federation.client_timeout_s": (checkpointed.federation.client_timeout_s, 30.0),
        "federation.max_parallel_clients": (1, 3),
    }
    assert set(changes) <= set(SAFE_ON_RESUME)


def test_fewer_rounds_than_completed_and_a_checkpoint_without_a_config_are_refused() -> None:
    config = build_config({"federation": {"rounds": 2}})
    with pytest.raises(ResumeRefused, match="2 is fewer than the 3 rounds already completed"):
        allowed_changes(_meta(build_config({})), config.model_dump(mode="json"), completed=3)
    with pytest.raises(ResumeRefused, match="records no config"):
        allowed_changes({}, config.model_dump(mode="json"), completed=1)


def test_the_data_version_changes_with_any_byte_or_file_of_the_partitions(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "client_0").mkdir()
    (tmp_path / "client_0" / "train.jsonl").write_text('{"a": 1}\n')
    (tmp_path / "test.jsonl").write_text('{"a": 2}\n')
    first = data_version(tmp_path)
    (tmp_path / "test.jsonl").write_text('{"a": 3}\n')
    second = data_version(tmp_path)
    (tmp_path / "client_1").mkdir()
    (tmp_path / "client_1" / "train.jsonl").write_text("")
    assert len({first, second, data_version(tmp_path)}) == 3


def test_the_cli_refuses_a_changed_resume_before_any_server_starts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    params = {"federation": {"output_dir": str(tmp_path / "run")}, "model": {"name_or_path": str(tmp_path / "none")}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    config = build_config(params)
    save_checkpoint(Checkpoint(1, {}, {}, meta=_meta(config)), tmp_path / "run")
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "flows.cli", "run", "-c", str(tmp_path / "params.yaml"), "--resume"]
    done = subprocess.run([*command, "-s", "train.lr=0.5"], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "train.lr: 0.002 in the checkpoint, 0.5 now" in done.stdout, done.stdout[-2000:]
    assert "Traceback" not in done.stdout + done.stderr and "temporary server" not in done.stdout + done.stderr


def test_a_data_file_changed_since_the_run_started_is_refused_on_resume(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Review finding: an edited data file resumed silently on the old partitions."""
    source = tmp_path / "rows.jsonl"
    source.write_text('{"instruction": "q", "response": "a"}\n')
    config = build_config({"data": {"source": str(source)}, "federation": {"output_dir": str(tmp_path / "run")}})
    save_checkpoint(
        Checkpoint(1, {}, {}, meta={**_meta(config), "source_version": source_version(str(source))}), tmp_path / "run"
    )
    check_resume(config)  # unchanged: accepted
    source.write_text('{"instruction": "q", "response": "b"}\n')
    with pytest.raises(ResumeRefused, match=r"data.source: .*rows.jsonl changed since the run started"):
        check_resume(config)
