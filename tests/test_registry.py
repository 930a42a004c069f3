"""A plain federated run registers its final adapter only when it beats the champion on the same
held-out set (or when told to), and the alias follows the best version."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlflow_tracking.registry import aliased_version, register_if_better
from mlflow_tracking.runs import RunTracker

NAME, ALIAS = "adapters", "champion"


def _run(tmp_path: Path, name: str) -> RunTracker:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = RunTracker.start(
        tracking_uri=uri, experiment="tests", artifact_location=str(tmp_path / "a"), run_name=name, params={}, tags={}
    )
    folder = tmp_path / name / "final"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    run.log_artifacts(folder, "adapters/final")
    return run


def _register(
    run: RunTracker, loss: float, test: str = "md5-a", always: bool = False, round_: str = "3", model: str = "m"
) -> tuple[str | None, str]:
    tags = {"lineage.data.test": test, "round": round_, "base_model": model, "peft_method": "lora"}
    return register_if_better(run, "adapters/final", NAME, ALIAS, loss, tags, always)


def _champion(run: RunTracker) -> str:
    found = aliased_version(run.client.tracking_uri, NAME, ALIAS)
    assert found is not None
    return found.number


def test_only_a_better_adapter_on_the_same_test_set_is_registered_and_becomes_the_champion(tmp_path: Path) -> None:
    first = _run(tmp_path, "first")
    assert _register(first, 1.0) == ("1", "registered version 1 as champion: no adapters@champion yet")
    assert _register(first, 1.0)[0] == "1"  # finishing the same run again registers nothing twice

    tie, better = _run(tmp_path, "tie"), _run(tmp_path, "better")
    assert _register(tie, 1.0) == (None, "not registered: test loss 1.000000 vs 1.000000 of version 1")
    # an adapter scored on another test set, or of another base model (an emulator's), is kept
    # in the registry but cannot take the alias, however low its loss
    assert _register(_run(tmp_path, "other-data"), 0.1, test="md5-b") == (
        "2",
        "registered version 2: not comparable with version 1 (lineage.data.test differ)",
    )
    assert _register(_run(tmp_path, "emulator"), 0.1, model="emulator")[1].endswith("(base_model differ)")
    assert _champion(first) == "1"
    assert _register(better, 0.5)[0] == "4"
    assert _champion(first) == "4" and first.client.get_model_version(NAME, "4").run_id == better.run_id
    assert first.client.get_model_version(NAME, "4").tags["test_loss"] == "0.500000"

    worse = _run(tmp_path, "worse")
    version, decision = _register(worse, 0.9, always=True)  # registered when told, champion unchanged
    assert version == "5" and decision.startswith("registered version 5: test loss")
    assert _champion(first) == "4"
    assert len(first.client.search_model_versions(f"name = '{NAME}'")) == 5

    # the champion's run resumed for more rounds competes with its own earlier end
    assert _register(better, 0.5, round_="4") == (None, "not registered: test loss 0.500000 vs 0.500000 of version 4")
    assert _register(better, 0.4, round_="5")[0] == "6"
    assert _champion(first) == "6"


@pytest.mark.parametrize(("value", "meant"), [(True, "always"), (False, "never"), ("if_better", "if_better")])
def test_register_final_accepts_the_old_booleans(value: object, meant: str) -> None:
    from fedtune.config.schema import build_config

    assert build_config({"tracking": {"register_final": value}}).tracking.register_final == meant
