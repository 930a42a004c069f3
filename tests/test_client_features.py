"""A client's round is a loop over `ClientFeature`s: a new feature plugs in through the catalog
alone, its hooks run in order, and what the client returns is a typed `ClientReport`."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune.core.catalog import CLIENT_FEATURES
from fedtune.data.loading import load_records
from fedtune.model.adapters import load_state, save_state
from fedtune.model.builder import initial_adapter_state
from fedtune.round.client import train_client
from fedtune.round.client_report import ClientReport, ReportRejected
from fedtune.training.client_feature import ClientFeature, ClientRound
from fedtune.training.tokenized import partition_records


class Recorder(ClientFeature):
    """A feature written outside fedtune: it records its hooks, halves the update, adds a field."""

    calls: list[str] = []
    trained: dict[str, torch.Tensor] = {}

    @classmethod
    def enabled(cls, cfg, client) -> bool:  # type: ignore[no-untyped-def]
        return client == 1

    def configure(self, r: ClientRound) -> None:
        self.calls.append("configure")

    def prepare_data(self, r: ClientRound) -> None:
        self.calls.append(f"prepare_data:{len(r.train)}")

    def prepare_training(self, r: ClientRound) -> None:
        self.calls.append(f"prepare_training:{r.steps}")

    def after_training(self, r: ClientRound) -> None:
        self.calls.append("after_training")
        Recorder.trained = {k: v - r.start[k] for k, v in r.local_state.items()}

    def outgoing(self, r: ClientRound, update):  # type: ignore[no-untyped-def]
        self.calls.append("outgoing")
        return {k: v / 2 for k, v in update.items()}

    def finish(self, r: ClientRound) -> None:
        self.calls.append("finish")
        r.report["recorder_tensors"] = float(len(Recorder.trained))


def test_a_new_feature_plugs_in_through_the_catalog_alone(tmp_path, tiny_config, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(CLIENT_FEATURES._items, "recorder", Recorder)  # what a plugin's registration does
    Recorder.calls.clear()
    partition_records(tiny_config, load_records(tiny_config.data))
    state, _ = initial_adapter_state(tiny_config)
    save_state(state, tmp_path / "global.safetensors")
    reports = {}
    for client in (0, 1):
        reports[client] = train_client(
            tiny_config,
            client=client,
            round_=1,
            global_path=tmp_path / "global.safetensors",
            update_path=tmp_path / f"update_{client}.safetensors",
            private_dir=tmp_path / f"client_{client}",
        )
    assert all(isinstance(r, ClientReport) for r in reports.values())
    steps = tiny_config.train.steps_per_round
    assert Recorder.calls[0] == "configure" and Recorder.calls[2] == f"prepare_training:{steps}"
    assert [c.split(":")[0] for c in Recorder.calls] == [
        "configure",
        "prepare_data",
        "prepare_training",
        "after_training",
        "outgoing",
        "finish",
    ]  # fmt: skip  (only client 1 enables it, once)
    assert reports[1].features == {"recorder_tensors": float(len(state))} and reports[0].features == {}
    sent = load_state(tmp_path / "update_1.safetensors")
    assert sent.keys() == state.keys()
    assert all(torch.allclose(sent[k], Recorder.trained[k] / 2) for k in state)  # the outgoing hook shaped it
    assert load_state(tmp_path / "global.safetensors").keys() == state.keys()


def test_reports_round_trip_and_malformed_ones_are_rejected_with_the_reason() -> None:
    report = ClientReport(
        client=2, round=3, num_examples=10, bytes_up=100, bytes_down=90, train_loss=1.0, train_loss_first=2.0,
        train_loss_last=0.5, val_loss=1.1, steps=4, tokens=80, seconds=1.5, val_seconds=0.2,
        features={"record_epsilon": 1.5},
    )  # fmt: skip
    row = report.row()
    assert row["record_epsilon"] == 1.5 and "features" not in row and "update_path" not in row
    assert ClientReport.from_row(json.loads(json.dumps(row))) == report
    for change, problem in (
        ({"num_examples": -5}, "num_examples"),
        ({"client": "two"}, "client"),
        ({"bytes_up": None}, "bytes_up"),
        ({"Weird Key": 1.0}, "feature fields"),
        ({"val_loss_personal": "low"}, "features.val_loss_personal"),
        ({"evil": float("nan")}, "are not finite numbers"),
        ({"big": float("inf")}, "are not finite numbers"),
    ):
        with pytest.raises(ReportRejected, match=problem):
            ClientReport.from_row({**row, **change})
    with pytest.raises(ReportRejected, match="steps"):
        ClientReport.from_row({k: v for k, v in row.items() if k != "steps"})
    with pytest.raises(ReportRejected, match="JSON object"):
        ClientReport.from_row([row])  # type: ignore[arg-type]
