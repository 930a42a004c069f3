"""Every combination the config accepts federates (docs/combinations.md, generated from the catalog
and the compat rules): one round of two clients on the tiny model, through the client's features
and the server's aggregation, and the new global adapter loads into a peft model. For the
averaging strategies it equals the example-weighted mean of the updates the clients sent."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fedtune.config.schema import ConfigError, build_config
from fedtune.data.loading import load_records
from fedtune.model.adapters import get_adapter_state, load_state, save_state, set_adapter_state
from fedtune.model.builder import build_peft_model, initial_adapter_state
from fedtune.round.client import train_client
from fedtune.round.secure_round import secure_aggregate
from fedtune.round.server import aggregate_reports
from fedtune.strategies.options import build_strategy
from fedtune.training.tokenized import partition_records
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from combinations import DOC, FEATURES, METHODS, STRATEGY_OPTIONS, document, merged  # noqa: E402

from fedtune.core.catalog import STRATEGIES  # noqa: E402

# round 1's global = the global plus the mean update: weighted by examples (FedAvg, FedProx) or
# not (SCAFFOLD, Karimireddy et al. 2020, alg. 1: the mean over the sampled clients)
AVERAGING = {"fedavg": True, "fedprox": True, "scaffold": False}
# the client features against the strategies that touch parameters by name or re-factor them, and
# against the PEFT methods whose state differs most from LoRA's (3 + 3 of the full table, for time)
FEATURE_STRATEGIES = ("fedavg", "scaffold", "flexlora")
FEATURE_METHODS = ("dora", "ia3", "prefix_tuning")


def test_the_combinations_page_is_current() -> None:
    """What `python scripts/combinations.py --check` compares, here rather than in a new process."""
    assert DOC.read_text() == document(), "docs/combinations.md is out of date: run python scripts/combinations.py"


@pytest.fixture(scope="module")
def partitions(tmp_path_factory, tiny_model_dir) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("combinations")
    overrides = tiny_overrides(root, tiny_model_dir)
    overrides["data"]["partition"] |= {"num_clients": 2, "alpha": 1.0}
    overrides["federation"] |= {"clients_per_round": 2, "min_fit_clients": 2}
    overrides["train"] |= {"steps_per_round": 2}
    config = build_config(overrides)
    partition_records(config, load_records(config.data))
    return overrides


def _one_round(overrides: dict[str, Any], extra: dict[str, Any], root: Path) -> None:
    if "distill" in extra:  # a teacher client's own model: the tiny model stands in
        extra = merged(
            extra,
            {"distill": {"teachers": dict.fromkeys(extra["distill"]["teachers"], overrides["model"]["name_or_path"])}},
        )
    try:
        config = build_config(merged(overrides, extra))
    except ConfigError:
        return  # refused when the config is built, with its reason: docs/combinations.md lists it
    strategy = build_strategy(config)
    torch.manual_seed(0)
    state, _ = initial_adapter_state(config)
    server = strategy.init_state(state)
    save_state(state, root / "global.safetensors")
    save_state(strategy.client_view(server), root / "view.safetensors")
    reports = [
        train_client(
            config, client=c, round_=1, global_path=root / "global.safetensors",
            update_path=root / f"update_{c}.safetensors", private_dir=root / f"client_{c}",
            server_view_path=root / "view.safetensors",
        ).row()
        for c in (0, 1)
    ]  # fmt: skip
    if config.secagg.enabled:
        new, _, left_out, _ = secure_aggregate(config, 1, state, server, reports, [], None)
    else:
        new, _, left_out = aggregate_reports(config, 1, state, reports, server)
    assert not left_out
    assert new.keys() == state.keys() and all(torch.isfinite(t).all() for t in new.values())
    model = build_peft_model(config)
    set_adapter_state(model, new)  # the new global loads into the configured peft model
    assert all(torch.equal(get_adapter_state(model)[k], new[k]) for k in new)
    plain = not (config.secagg.enabled or config.compression.method != "none" or config.peft.client_ranks)
    if config.federation.strategy in AVERAGING and plain and not config.federation.personal_modules:
        weighted = AVERAGING[config.federation.strategy]
        weights = [r["num_examples"] if weighted else 1 for r in reports]
        deltas = [load_state(r["update_path"]) for r in reports]
        for key in state:
            mean = sum(w * d[key] for w, d in zip(weights, deltas, strict=True)) / sum(weights)
            assert torch.allclose(new[key], state[key] + mean, atol=1e-6), key


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("strategy", STRATEGIES.names())
def test_every_accepted_strategy_and_peft_method_federates(partitions, tmp_path, strategy, method) -> None:  # type: ignore[no-untyped-def]
    options = STRATEGY_OPTIONS.get(strategy, {})
    _one_round(
        partitions,
        {"federation": {"strategy": strategy, "strategy_options": options}, "peft": METHODS[method]},
        tmp_path,
    )


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("strategy", FEATURE_STRATEGIES)
def test_every_accepted_client_feature_federates_with_each_strategy(partitions, tmp_path, strategy, feature) -> None:  # type: ignore[no-untyped-def]
    options = STRATEGY_OPTIONS.get(strategy, {})
    _one_round(
        partitions,
        merged({"federation": {"strategy": strategy, "strategy_options": options}}, FEATURES[feature]),
        tmp_path,
    )


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_every_accepted_client_feature_federates_with_each_peft_method(partitions, tmp_path, method, feature) -> None:  # type: ignore[no-untyped-def]
    _one_round(partitions, merged({"peft": METHODS[method]}, FEATURES[feature]), tmp_path)
