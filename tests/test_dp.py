"""Client-level DP: accounting against reference values, noise calibration, clipping bounds."""

import math

import pytest
import torch

from fedtune.config.schema import ConfigError, build_config
from fedtune.model.adapters import clip_to_norm, l2_norm, load_state, save_state
from fedtune.privacy.dp_fedavg import LEDGER, DPFedAvg, epsilon
from fedtune.strategies.base import ClientUpdate
from fedtune.strategies.options import build_strategy


# references at delta 1e-5 from an accountant independent of the one fedtune uses (Opacus): Google's
# dp-accounting 0.6, RdpAccountant over SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), rounds)
@pytest.mark.parametrize(
    ("z", "q", "rounds", "reference"), [(1.0, 0.1, 200, 11.063), (1.0, 1.0, 20, 30.127), (2.0, 1.0, 20, 12.302)]
)
def test_epsilon_matches_reference_values_within_one_percent(z, q, rounds, reference) -> None:  # type: ignore[no-untyped-def]
    assert epsilon(z, q, rounds, 1e-5) == pytest.approx(reference, rel=0.01)
    strategy = DPFedAvg(clip_norm=1.0, noise_multiplier=z, expected_clients=10, sample_rate=q)
    state = {**strategy.init_state({}), LEDGER: strategy.ledger(rounds)}
    assert strategy.state_metrics(state)["dp_epsilon"] == pytest.approx(reference, rel=0.01)


def test_noise_on_zero_updates_has_std_z_c_over_n_expected() -> None:
    z, c, expected = 1.3, 0.7, 8
    strategy = DPFedAvg(clip_norm=c, noise_multiplier=z, expected_clients=expected, sample_rate=0.5)
    state = strategy.init_state({})
    zeros = {"a": torch.zeros(300, 256), "b": torch.zeros(50_000)}  # 126,800 coordinates
    updates = [ClientUpdate(i, zeros, num_examples=10) for i in range(5)]  # fewer replies than expected
    aggregate, new_state = strategy.aggregate(zeros, updates, state)
    noise = torch.cat([t.reshape(-1) for t in aggregate.values()]).to(torch.float64)
    assert noise.numel() >= 100_000
    assert float(noise.std()) == pytest.approx(z * c / expected, rel=0.01)
    assert abs(float(noise.mean())) < 4 * z * c / expected / math.sqrt(noise.numel())
    assert new_state[LEDGER].tolist() == [[z, 0.5, c, 5]] and torch.equal(
        new_state["dp.noise_secret"], state["dp.noise_secret"]
    )


def test_clipping_bounds_every_update_and_passes_zero() -> None:
    g = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 1e3):
        state = {"a": scale * torch.randn(40, 40, generator=g), "b": scale * torch.randn(7, generator=g)}
        assert l2_norm(clip_to_norm(state, 0.5)) <= 0.5
    zero = {"a": torch.zeros(3)}
    assert torch.equal(clip_to_norm(zero, 0.5)["a"], zero["a"])


def test_one_client_moves_the_average_by_at_most_c_over_n_expected() -> None:
    strategy = DPFedAvg(clip_norm=2.0, noise_multiplier=1e-9, expected_clients=4, sample_rate=0.5)
    state = strategy.init_state({})
    zeros = {"w": torch.zeros(1000)}
    honest = [ClientUpdate(i, zeros, num_examples=10) for i in range(3)]
    rogue = ClientUpdate(9, {"w": torch.full((1000,), 1e6)}, num_examples=10**9)
    aggregate, _ = strategy.aggregate(zeros, [*honest, rogue], state)
    assert l2_norm(aggregate) <= 2.0 / 4 + 1e-6


def test_noise_is_reproducible_from_the_checkpointed_state_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """rel-17: with many tensors, the noise must not follow the order of the update's dict (which
    safetensors randomizes between loads), or a resumed round draws other noise."""
    strategy = DPFedAvg(clip_norm=1.0, noise_multiplier=1.0, expected_clients=2, sample_rate=1.0)
    zeros = {f"layers.{i}.{m}.lora_{ab}.weight": torch.zeros(4, 16) for i in range(4) for m in "qv" for ab in "AB"}
    state = strategy.init_state(zeros)
    first, _ = strategy.aggregate(zeros, [ClientUpdate(0, zeros, 1)], state)
    backwards = dict(reversed(zeros.items()))
    again, _ = strategy.aggregate(backwards, [ClientUpdate(0, backwards, 1)], {k: v.clone() for k, v in state.items()})
    other, _ = strategy.aggregate(zeros, [ClientUpdate(0, zeros, 1)], strategy.init_state(zeros))  # another secret
    assert all(torch.equal(first[k], again[k]) for k in zeros)
    assert not any(torch.equal(first[k], other[k]) for k in zeros)
    save_state(dict(reversed(zeros.items())), tmp_path / "update.safetensors")
    loads = [list(load_state(tmp_path / "update.safetensors")) for _ in range(5)]
    assert all(keys == sorted(zeros) for keys in loads)  # every load in one order


def test_epsilon_comes_from_the_ledger_of_releases_and_never_decreases() -> None:
    """rel-13: rounds released at z = 1 were re-priced at z = 4 when a resume changed the option
    (9.01 after three releases became 1.85); the ledger's rows, not the config, are what is charged."""
    first = DPFedAvg(clip_norm=0.5, noise_multiplier=1.0, expected_clients=3, sample_rate=1.0)
    state = first.init_state({"w": torch.zeros(4)})
    spent = []
    for _ in range(3):
        _, state = first.aggregate({"w": torch.zeros(4)}, [ClientUpdate(0, {"w": torch.ones(4)}, 1)], state)
        spent.append(first.state_metrics(state)["dp_epsilon"])
    assert spent == sorted(spent) and spent[-1] == pytest.approx(epsilon(1.0, 1.0, 3, 1e-5))
    later = DPFedAvg(clip_norm=0.5, noise_multiplier=4.0, expected_clients=3, sample_rate=1.0)
    assert later.state_metrics(state)["dp_epsilon"] == pytest.approx(spent[-1])  # not re-priced at z = 4
    _, state = later.aggregate({"w": torch.zeros(4)}, [ClientUpdate(0, {"w": torch.ones(4)}, 1)], state)
    assert later.state_metrics(state)["dp_epsilon"] > spent[-1]  # a fourth release at z = 4 adds to it
    assert [row[0] for row in state[LEDGER].tolist()] == [1.0, 1.0, 1.0, 4.0]


def test_budget_stops_before_the_target_and_bad_options_are_refused() -> None:
    config = build_config(
        {
            "federation": {
                "strategy": "dp_fedavg",
                "clients_per_round": 3,
                "strategy_options": {"clip_norm": 1.0, "noise_multiplier": 1.0, "target_epsilon": 10.0},
            },
            "data": {"partition": {"num_clients": 3}},
        }
    )
    strategy = build_strategy(config)
    assert (
        isinstance(strategy, DPFedAvg)
        and strategy.options.sample_rate == 1.0
        and strategy.options.expected_clients == 3
    )
    start = strategy.init_state({})
    allowed = [r for r in range(30) if strategy.can_continue({**start, LEDGER: strategy.ledger(r)})]
    last = max(allowed) + 1  # rounds that can be completed
    assert strategy.epsilon_after(last) <= 10.0 < strategy.epsilon_after(last + 1)
    with pytest.raises(ConfigError, match="cannot afford a single round"):
        build_config(
            {
                "federation": {
                    "strategy": "dp_fedavg",
                    "strategy_options": {"clip_norm": 1, "noise_multiplier": 0.3, "target_epsilon": 1},
                }
            }
        )
    with pytest.raises(
        ConfigError,
        match=r"clip_norm: dp_fedavg: Input should be greater than 0\n.*accountant: dp_fedavg: .*'rdp' or 'prv'",
    ):
        build_config(
            {
                "federation": {
                    "strategy": "dp_fedavg",
                    "strategy_options": {"clip_norm": 0, "noise_multiplier": 1, "accountant": "moments"},
                }
            }
        )


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"sample_rate": 0.001}, "sample_rate: derived from the federation's shape"),  # eps 0.61 instead of 9.01
        ({"distributed": 0}, "distributed: derived"),  # secure aggregation without the clients' noise
        ({"clip_norm": float("inf")}, "clip_norm=inf: every option must be a finite number"),  # no clipping
        ({"clip_norm": float("nan")}, "clip_norm=nan: every option"),
        ({"target_epsilon": float("nan")}, "target_epsilon=nan: every option"),  # the budget stop silently off
    ],
)
def test_options_that_break_the_privacy_claim_are_refused_when_the_config_is_built(options, named) -> None:  # type: ignore[no-untyped-def]
    """rel-05: options merged over the derived sampling rate, and NaN or infinite DP parameters."""
    federation = {"strategy": "dp_fedavg", "strategy_options": {"clip_norm": 0.5, "noise_multiplier": 1.0} | options}
    with pytest.raises(ConfigError, match=named):
        build_config({"federation": federation, "secagg": {"enabled": True}})


def test_no_number_anywhere_in_the_config_may_be_nan_or_infinite() -> None:
    for section, field in (
        ("record_dp", "delta"),
        ("secagg", "clip"),
        ("train", "lr"),
        ("record_dp", "target_epsilon"),
    ):
        with pytest.raises(ConfigError, match=f"{section}.{field}: Input should be a finite number"):
            build_config({section: {field: float("nan")}})


def test_adaptive_clipping_tracks_the_target_quantile_and_pays_for_the_count() -> None:
    from fedtune.privacy.dp_fedavg import CLIP

    strategy = DPFedAvg(
        clip_norm=0.1,
        noise_multiplier=1.0,
        expected_clients=20,
        sample_rate=0.5,
        target_quantile=0.5,
        clip_learning_rate=0.5,
    )
    # the count's noise takes part of the budget: the update's multiplier grows, the accountant's z does not
    assert strategy.options.update_multiplier == pytest.approx((1.0**-2 - (2 * 1.0) ** -2) ** -0.5)
    g = torch.Generator().manual_seed(0)
    norms = torch.linspace(1.0, 3.0, 20)  # median 2.0
    updates = [
        ClientUpdate(i, {"w": n * torch.nn.functional.normalize(torch.randn(50, generator=g), dim=0)}, 1)
        for i, n in enumerate(norms)
    ]
    state = strategy.init_state({})
    zeros = {"w": torch.zeros(50)}
    for _ in range(40):
        _, state = strategy.aggregate(zeros, updates, state)
    assert 1.6 < float(state[CLIP]) < 2.4  # near the median norm, from 0.1
    assert strategy.state_metrics(state)["dp_epsilon"] == pytest.approx(epsilon(1.0, 0.5, 40, 1e-5))
    with pytest.raises(ValueError, match="count_noise_std > noise_multiplier / 2"):
        DPFedAvg(clip_norm=1, noise_multiplier=4, expected_clients=20, sample_rate=0.5, target_quantile=0.5)
