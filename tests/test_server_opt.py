"""Server optimizers: cross-checked against Flower's strategies on identical updates, by hand where
we differ on purpose, exact across a checkpoint, and wired into the flow."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.config.schema import ConfigError, build_config
from fedtune.core.catalog import STRATEGIES
from fedtune.data.partition import read_split
from fedtune.model.adapters import AdapterState, load_state, save_state
from fedtune.strategies.base import ClientUpdate
from fedtune.strategies.options import build_strategy
from fedtune.strategies.server_opt import FedAdam
from tests.conftest import tiny_overrides

FLOWER = Path(__file__).resolve().parents[1] / ".venv-flower" / "bin" / "python"
SHAPES = [(4, 6), (6,), (2, 3, 2)]
ROUNDS, CLIENTS = 4, 4


def _updates(seed: int = 0) -> tuple[AdapterState, list[list[ClientUpdate]]]:
    """A float64 global and, per round, each client's delta and example count."""
    rng = np.random.default_rng(seed)
    start = {f"t{i}": torch.from_numpy(rng.normal(0, 0.1, shape)) for i, shape in enumerate(SHAPES)}
    rounds = [
        [
            ClientUpdate(
                c,
                {k: torch.from_numpy(rng.normal(0.002 * (c - 1), 0.01, v.shape)) for k, v in start.items()},
                int(rng.integers(5, 50)),
            )
            for c in range(CLIENTS)
        ]
        for _ in range(ROUNDS)
    ]
    return start, rounds


def _ours(name: str, options: dict) -> list[AdapterState]:
    strategy = STRATEGIES.get(name)(**options)
    state, rounds = _updates()
    server = strategy.init_state(state)
    history = []
    for updates in rounds:
        state, server = strategy.aggregate(state, updates, server)
        history.append(state)
    return history


def _flower(tmp_path: Path, strategy: str, options: dict, round_offset: int = 0) -> list[AdapterState]:
    start, rounds = _updates()
    keys = sorted(start)
    arrays = {f"init_{t}": start[k].numpy() for t, k in enumerate(keys)}
    for r, updates in enumerate(rounds, 1):
        for u in updates:
            arrays |= {f"delta_r{r}_c{u.client}_{t}": u.delta[k].numpy() for t, k in enumerate(keys)}
            arrays[f"examples_r{r}_c{u.client}"] = np.array(u.num_examples)
    np.savez(tmp_path / "in.npz", **arrays)
    spec = {"strategy": strategy, "options": options, "rounds": ROUNDS, "clients": CLIENTS, "tensors": len(keys)}
    (tmp_path / "spec.json").write_text(json.dumps({**spec, "round_offset": round_offset}))
    script = Path(__file__).with_name("flower_reference.py")
    done = subprocess.run(
        [str(FLOWER), str(script), str(tmp_path / "in.npz"), str(tmp_path / "spec.json"), str(tmp_path / "out.npz")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    return [{k: torch.from_numpy(out[f"global_r{r}_{t}"]) for t, k in enumerate(keys)} for r in range(1, ROUNDS + 1)]


def _max_difference(a: list[AdapterState], b: list[AdapterState]) -> float:
    return max(float((x[k] - y[k]).abs().max()) for x, y in zip(a, b, strict=True) for k in x)


# (ours, our options, Flower's class, Flower's options, round offset). Flower's FedAdam applies the
# Adam bias correction at round t+1, ours (bias_correction=True) at t: Flower is told round t-1.
CROSS_CHECKS = [
    ("fedavg", {}, "FedAvg", {}, 0),
    ("fedavgm", {"server_lr": 0.7, "momentum": 0.9}, "FedAvgM",
     {"server_learning_rate": 0.7, "server_momentum": 0.9}, 0),
    ("fedadagrad", {"eta": 0.05, "tau": 1e-3}, "FedAdagrad", {"eta": 0.05, "tau": 1e-3}, 0),
    ("fedyogi", {"eta": 0.02, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-3}, "FedYogi",
     {"eta": 0.02, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-3}, 0),
    ("fedadam", {"eta": 0.03, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3, "bias_correction": True}, "FedAdam",
     {"eta": 0.03, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}, -1),
]  # fmt: skip


@pytest.mark.skipif(not FLOWER.exists(), reason="Flower's venv: make .venv-flower/bin/flwr (make test does)")
@pytest.mark.parametrize(("ours", "options", "flower", "flower_options", "offset"), CROSS_CHECKS, ids=lambda v: str(v))
def test_matches_flowers_strategy_over_four_rounds(tmp_path, ours, options, flower, flower_options, offset) -> None:  # type: ignore[no-untyped-def]
    mine = _ours(ours, options)
    assert _max_difference(mine, _flower(tmp_path, flower, flower_options, offset)) <= 1e-6
    if ours != "fedavg":  # the optimizer really stepped: not what plain FedAvg gives
        assert _max_difference(mine, _ours("fedavg", {})) > 1e-3


def test_fedadam_without_bias_correction_follows_the_paper_by_hand() -> None:
    """Reddi et al. Alg. 2 on one coordinate, two rounds, two clients (examples 1 and 3)."""
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    strategy = FedAdam(eta=eta, beta_1=b1, beta_2=b2, tau=tau)
    x = {"w": torch.tensor([1.0], dtype=torch.float64)}
    server = strategy.init_state(x)
    m = v = 0.0
    expected = 1.0
    for deltas in ([0.4, 0.0], [-0.2, 0.2]):
        mean = (1 * deltas[0] + 3 * deltas[1]) / 4
        m = b1 * m + (1 - b1) * mean
        v = b2 * v + (1 - b2) * mean**2
        expected += eta * m / (v**0.5 + tau)
        updates = [ClientUpdate(c, {"w": torch.tensor([d], dtype=torch.float64)}, n) for c, (d, n) in
                   enumerate(zip(deltas, (1, 3), strict=True))]  # fmt: skip
        x, server = strategy.aggregate(x, updates, server)
        assert float(x["w"]) == pytest.approx(expected, abs=1e-12)
    assert int(server["opt.step"]) == 2


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedyogi", "fedadam"])
def test_a_checkpointed_state_continues_bit_for_bit(tmp_path, name) -> None:  # type: ignore[no-untyped-def]
    strategy = STRATEGIES.get(name)()
    state, rounds = _updates(seed=3)
    server = strategy.init_state(state)
    straight = state
    for r, updates in enumerate(rounds):
        if r == 2:  # through the checkpoint's file format and back, as a resumed run reads it
            save_state(server, tmp_path / "server.safetensors")
            server = load_state(tmp_path / "server.safetensors")
        state, server = strategy.aggregate(state, updates, server)
    reference = STRATEGIES.get(name)()
    server = reference.init_state(straight)
    for updates in rounds:
        straight, server = reference.aggregate(straight, updates, server)
    assert all(torch.equal(state[k], straight[k]) for k in state)


def test_bad_server_optimizer_options_name_the_field() -> None:
    with pytest.raises(ConfigError, match="strategy_options.lr: fedadam: Extra inputs are not permitted"):
        build_config({"federation": {"strategy": "fedadam", "strategy_options": {"lr": 0.1}}})
    with pytest.raises(ConfigError, match="strategy_options.beta_2: fedyogi: Input should be less than 1"):
        build_config({"federation": {"strategy": "fedyogi", "strategy_options": {"beta_2": 1.5}}})


def test_fedadam_in_the_flow_steps_from_the_round_mean_and_checkpoints_its_moments(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from flows.federated_finetune import federated_finetune

    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    overrides["federation"] |= {"rounds": 2, "clients_per_round": 3, "strategy": "fedadam"}
    overrides["train"] |= {"steps_per_round": 2}
    overrides["eval"] |= {"generation_samples": 0}
    config = build_config(overrides)
    federated_finetune(config=config)
    out = Path(config.federation.output_dir)
    examples = [len(read_split(config.data.partitions_dir, c, "train")) for c in range(3)]
    state = load_state(out / "checkpoints" / "round_0000" / "global.safetensors")
    strategy = build_strategy(config)
    server = strategy.init_state(state)
    for r in (1, 2):
        updates = [
            ClientUpdate(c, load_state(out / "rounds" / f"round_{r:04d}" / f"update_client_{c}.safetensors"), n)
            for c, n in enumerate(examples)
        ]
        state, server = strategy.aggregate(state, updates, server)
    final = load_state(out / "final_adapter.safetensors")
    assert all(torch.allclose(final[k], state[k], atol=1e-7) for k in final)
    checkpointed = load_state(out / "checkpoints" / "round_0002" / "server_state.safetensors")
    assert int(checkpointed["opt.step"]) == 2 and set(checkpointed) == set(server)
