"""SCAFFOLD: the control-variate updates by hand, on the wire, and through a real federated run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from fedtune.config.schema import ConfigError, build_config
from fedtune.model.adapters import load_state, save_state
from fedtune.round.envelope import UpdateRejected, UpdateValidator, write_update
from fedtune.strategies.base import ClientUpdate
from fedtune.strategies.scaffold import CONTROL, Scaffold
from fedtune.training.client_feature import own_state
from tests.conftest import tiny_overrides

T = torch.tensor


def test_the_server_step_by_hand() -> None:
    strategy = Scaffold(num_clients=4, server_lr=0.5)
    x = {"w": T([1.0, 2.0])}
    state = {"scaffold.c.w": T([0.1, -0.1])}
    updates = [
        ClientUpdate(0, {"w": T([0.2, 0.4])}, 10, {CONTROL: {"w": T([1.0, 0.0])}}),
        ClientUpdate(1, {"w": T([0.6, 0.0])}, 90, {CONTROL: {"w": T([0.2, 2.0])}}),
    ]
    new_x, new_state = strategy.aggregate(x, updates, state)
    assert torch.allclose(new_x["w"], T([1.0 + 0.5 * 0.4, 2.0 + 0.5 * 0.2]))  # uniform mean, not weighted
    assert torch.allclose(new_state["scaffold.c.w"], T([0.1 + 1.2 / 4, -0.1 + 2.0 / 4]))  # (1/N) sum, N = 4
    assert strategy.client_view(new_state) == {"w": new_state["scaffold.c.w"]}


def test_the_client_control_variate_by_hand() -> None:
    """Option II: c_i+ = c_i - c + (x - y_i) / (K eta_l); the client sends c_i+ - c_i."""
    strategy = Scaffold(num_clients=3)
    x, y = {"w": T([1.0, 1.0])}, {"w": T([0.8, 1.4])}
    c, c_i = {"w": T([0.05, 0.0])}, {"w": T([0.01, -0.02])}
    extras, new = strategy.client_step(x, y, c, c_i, steps=4, lr=0.05)
    expected = T([0.01 - 0.05 + 0.2 / 0.2, -0.02 - 0.0 - 0.4 / 0.2])
    assert torch.allclose(new["w"], expected)
    assert torch.allclose(extras[CONTROL]["w"], expected - c_i["w"])
    _, first = strategy.client_step(x, y, c, None, steps=4, lr=0.05)  # c_i starts at zero
    assert torch.allclose(first["w"], T([-0.05 + 1.0, -2.0]))


def test_the_correction_adds_c_minus_c_i_to_every_gradient() -> None:
    w = torch.nn.Parameter(T([0.3, -0.7]))
    key = "m.lora_A.weight"
    term = Scaffold(num_clients=2).local_objective({key: T([0.0, 0.0])}, {key: T([0.5, 0.1])}, {key: T([0.2, 0.4])})
    loss = term.extra_loss({"m.lora_A.weight": w})
    assert loss is not None
    loss.backward()
    assert torch.allclose(w.grad, T([0.3, -0.3]))


def test_an_update_without_its_control_variate_is_rejected(tmp_path: Path) -> None:
    global_state = {"w": T([0.0, 0.0])}
    validator = UpdateValidator(global_state, 1, max_bytes=10_000, max_examples=100, extras=(CONTROL,))
    write_update(
        {"w": T([0.1, 0.2])}, tmp_path / "ok.safetensors", round_=1, client=0, extras={CONTROL: {"w": T([1.0, 2.0])}}
    )
    delta, extras = validator.split(validator.check(0, tmp_path / "ok.safetensors", 5))
    assert torch.equal(delta["w"], T([0.1, 0.2])) and torch.equal(extras[CONTROL]["w"], T([1.0, 2.0]))
    write_update({"w": T([0.1, 0.2])}, tmp_path / "bare.safetensors", round_=1, client=1)
    with pytest.raises(UpdateRejected, match="tensor control/w: missing tensor"):
        validator.check(1, tmp_path / "bare.safetensors", 5)


def test_a_recomputed_round_starts_from_the_state_before_it(tmp_path: Path) -> None:
    for r in (1, 3):
        save_state({"w": T([float(r)])}, tmp_path / "strategy" / f"round_{r:04d}.safetensors")
    assert own_state(tmp_path, 1) is None
    assert float(own_state(tmp_path, 3)["w"]) == 1.0  # type: ignore[index]  # round 3 again: not its own output
    assert float(own_state(tmp_path, 4)["w"]) == 3.0  # type: ignore[index]


def test_secure_aggregation_refuses_scaffold() -> None:
    with pytest.raises(ConfigError, match="'scaffold' sends control beside each update"):
        build_config({"federation": {"strategy": "scaffold"}, "secagg": {"enabled": True}})


def test_a_scaffold_run_keeps_each_clients_variate_and_the_server_sums_them(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from flows.federated_finetune import federated_finetune

    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    overrides["federation"] |= {"rounds": 2, "clients_per_round": 3, "strategy": "scaffold"}
    overrides["train"] |= {"steps_per_round": 3}
    overrides["eval"] |= {"generation_samples": 0}
    config = build_config(overrides)
    summary = federated_finetune(config=config)
    out = Path(config.federation.output_dir)
    steps, lr = config.train.steps_per_round, config.train.lr
    sent = [load_state(out / "rounds" / "round_0001" / f"update_client_{c}.safetensors") for c in range(3)]
    server = load_state(out / "checkpoints" / "round_0001" / "server_state.safetensors")
    for key in (k for k in sent[0] if not k.startswith("control/")):
        assert torch.allclose(server[f"scaffold.c.{key}"], sum(u[f"control/{key}"] for u in sent) / 3, atol=1e-7)
    for c, update in enumerate(sent):  # from c = c_i = 0: c_i+ = -(y_i - x) / (K eta_l)
        own = load_state(out / "clients" / f"client_{c}" / "strategy" / "round_0001.safetensors")
        assert all(torch.allclose(own[k], -update[k] / (steps * lr), atol=1e-5) for k in own)
        assert (out / "clients" / f"client_{c}" / "strategy" / "round_0002.safetensors").exists()
    with (out / "rounds.csv").open() as handle:
        losses = [float(row["test_loss"]) for row in csv.DictReader(handle)]
    assert summary["test_loss"] == pytest.approx(losses[-1]) and losses[-1] < losses[0]  # it learns
