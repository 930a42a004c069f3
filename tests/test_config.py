import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedtune.config.schema import ConfigError, FedConfig, apply_overrides, build_config, load_config
from fedtune.core.catalog import OBJECTIVES, PARTITIONERS, PEFT_METHODS, STRATEGIES, STRATEGY_OPTIONS


def test_defaults_are_valid_and_params_yaml_loads() -> None:
    FedConfig()
    config = load_config(Path(__file__).parents[1] / "params.yaml")
    assert config.federation.rounds >= 3 and config.data.partition.num_clients >= 3


def test_overrides_parse_yaml_values() -> None:
    data = apply_overrides({"federation": {"rounds": 3}}, ["federation.rounds=5", "peft.target_modules=[q_proj]"])
    config = build_config(data)
    assert config.federation.rounds == 5 and config.peft.target_modules == ["q_proj"]


def test_all_invalid_fields_reported_together_with_paths() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(
            {
                "federation": {"rounds": 0, "strategy": "fedadgrad"},
                "peft": {"method": "lorax"},
                "train": {"lr": -1},
                "data": {"partition": {"scheme": "banana"}},
            }
        )
    text = str(info.value)
    for path in ("federation.rounds", "federation.strategy", "peft.method", "train.lr", "data.partition.scheme"):
        assert path in text
    assert "unknown strategy 'fedadgrad'; known: dp_fedavg, fedadagrad, fedadam, fedavg, fedavgm" in text
    assert len(info.value.problems) == 5


def test_cross_section_rules() -> None:
    with pytest.raises(ConfigError, match="federation.clients_per_round: 5 exceeds data.partition.num_clients"):
        build_config({"federation": {"clients_per_round": 5}, "data": {"partition": {"num_clients": 3}}})
    with pytest.raises(ConfigError, match="exactly one of steps_per_round and epochs_per_round"):
        build_config({"train": {"steps_per_round": None}})


def test_unknown_keys_and_bad_override_syntax_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="federation.roundz"):
        build_config({"federation": {"roundz": 3}})
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["federation.rounds"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_fingerprint_changes_with_config(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"federation": {"rounds": 4}}))
    assert load_config(path).fingerprint() != FedConfig().fingerprint()
    assert load_config(path).fingerprint() == load_config(path).fingerprint()


def test_independent_cross_feature_problems_are_reported_together_with_their_paths() -> None:
    with pytest.raises(ConfigError) as info:
        build_config(
            {
                "federation": {"clients_per_round": 5},
                "data": {"partition": {"num_clients": 3}},
                "record_dp": {"enabled": True},
                "train": {"grad_accum": 2},
                "distill": {"server_model": "some/model"},
                "peft": {"method": "lora", "client_ranks": {7: 4}},
            }
        )
    paths = [line.split(":")[0] for line in info.value.problems]
    assert paths == [
        "federation.clients_per_round",
        "train.grad_accum",
        "peft.client_ranks",
        "distill.public_source",
    ], info.value.problems


def test_cross_feature_rules_run_beside_field_errors() -> None:
    """A field error elsewhere (and in the same section) does not hide the cross-feature problems."""
    with pytest.raises(ConfigError) as info:
        build_config(
            {
                "federation": {"rounds": 0, "clients_per_round": 5},
                "data": {"partition": {"num_clients": 3}},
                "train": {"lr": -1, "grad_accum": 2},
                "record_dp": {"enabled": True},
            }
        )
    assert [line.split(":")[0] for line in info.value.problems] == [
        "federation.rounds",
        "train.lr",
        "federation.clients_per_round",
        "train.grad_accum",
    ], info.value.problems


def test_a_sections_own_rule_does_not_hide_the_others() -> None:
    """A section's cross-field rule (min_fit_clients <= clients_per_round) is one problem among the
    others of that section, not a reason to set the whole section aside (issue 12)."""
    with pytest.raises(ConfigError) as info:
        build_config(
            {
                "federation": {"strategy": "krum", "clients_per_round": 3, "min_fit_clients": 4},
                "train": {"steps_per_round": None},
                "peft": {"client_ranks": {0: 99}},
            }
        )
    assert [line.split(":")[0] for line in info.value.problems] == [
        "peft.client_ranks",
        "train.steps_per_round",
        "federation.min_fit_clients",
        "federation.strategy",
    ], info.value.problems


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (  # a bad list item
            {"federation": {"clients_per_round": 10, "personal_modules": [None]}},
            ["federation.personal_modules.0", "federation.clients_per_round"],
        ),
        (  # an option that is not a number or a string
            {"federation": {"min_fit_clients": 5, "strategy_options": {"a": None}}},
            ["federation.strategy_options", "federation.min_fit_clients"],
        ),
        (  # a derived option beside two other bad ones
            {"federation": {"strategy": "fedprox", "strategy_options": {"sample_rate": 0.5, "mu": -1, "bogus": 2}}},
            ["federation.strategy_options", "federation.strategy_options.mu", "federation.strategy_options.bogus"],
        ),
        (  # the strategy's own limit and secure aggregation's, which does not depend on it
            {"federation": {"strategy": "krum", "clients_per_round": 3}, "secagg": {"enabled": True}},
            ["federation.strategy", "secagg.enabled"],
        ),
    ],
)
def test_no_problem_hides_another(overrides: dict, expected: list[str]) -> None:  # review findings, issue 12
    with pytest.raises(ConfigError) as info:
        build_config(overrides)
    assert [line.split(":")[0] for line in info.value.problems] == expected, info.value.problems


def test_each_strategy_has_options_under_the_same_name() -> None:
    assert STRATEGY_OPTIONS.names() == STRATEGIES.names()
    for name in STRATEGIES.names():
        assert STRATEGIES.get(name).Options is STRATEGY_OPTIONS.get(name), name


def test_every_rule_is_checked_without_importing_torch() -> None:
    """Building and checking a config imports no heavy module, whatever it enables: bad names, every
    strategy's options and limits, secure aggregation (with DP-FedAvg's Skellam arithmetic too),
    record-level DP, heterogeneous ranks, personal modules, watermarks (issue 12: `fedtune check` in
    a fraction of a second). Only a DP target_epsilon prices a round with Opacus' accountant."""
    code = """
import sys
from fedtune.config.schema import ConfigError, FedConfig, build_config
from fedtune.core.catalog import STRATEGY_OPTIONS

def problems(overrides):
    try:
        build_config(overrides)
    except ConfigError as error:
        return error.problems
    return []

FedConfig()
assert len(problems({'federation': {'strategy': 'fedadgrad'}, 'peft': {'method': 'lorax'}})) == 2
dp = {'clip_norm': 1.0, 'noise_multiplier': 1.0}
for name in STRATEGY_OPTIONS.names():
    found = problems({'federation': {'strategy': name, 'strategy_options': {'bogus': 1}}})
    assert any('strategy_options.bogus' in p for p in found), (name, found)
    options = dp if name == 'dp_fedavg' else {}
    problems({'federation': {'strategy': name, 'strategy_options': options, 'clients_per_round': 2,
              'personal_modules': ['lora_A']}, 'secagg': {'enabled': True}, 'record_dp': {'enabled': True},
              'peft': {'client_ranks': {0: 2}}, 'watermark': {'clients': [0]}})
found = problems({'federation': {'strategy': 'dp_fedavg', 'strategy_options': dp}, 'secagg': {'enabled': True,
                  'modulus_bits': 20}})
assert any(p.startswith('secagg:') for p in found), found
heavy = [m for m in ('torch', 'peft', 'transformers', 'opacus', 'flwr_datasets') if m in sys.modules]
assert not heavy, heavy
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("family", [STRATEGIES, PEFT_METHODS, PARTITIONERS, OBJECTIVES], ids=lambda r: r.kind)
def test_every_catalog_name_resolves_to_its_implementation(family) -> None:  # type: ignore[no-untyped-def]
    for name in family.names():
        assert family.get(name) is not None


def test_the_prefect_form_offers_registered_names_as_choices() -> None:
    schema = json.dumps(FedConfig.model_json_schema())
    for family in (STRATEGIES, PEFT_METHODS, PARTITIONERS, OBJECTIVES):
        assert json.dumps({"enum": family.names()})[1:-1] in schema, family.kind


def test_yaml_errors_name_the_file_line_and_column(tmp_path: Path) -> None:
    """rel-01: a YAML syntax error is a ConfigError (exit 2 in the CLI), not a scanner traceback."""
    path = tmp_path / "params.yaml"
    path.write_text("federation:\n  rounds: 3\n   clients_per_round: 2\n")
    with pytest.raises(ConfigError, match=r"params.yaml: line 3, column 21: mapping values are not allowed here"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"-s federation.strategy_options=\{eta: 0.01: line 1, column 11"):
        load_config(None, ["federation.strategy_options={eta: 0.01"])
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="a mapping of sections"):
        load_config(path)


def test_combinations_that_fail_at_run_time_are_refused_when_the_config_is_built() -> None:
    """Found by tests/test_combinations.py: each used to fail inside a client's round."""
    cases = [
        ({"record_dp": {"enabled": True}, "federation": {"strategy": "fedprox"}}, "record_dp.enabled: fedprox adds"),
        ({"record_dp": {"enabled": True}, "peft": {"use_dora": True}}, "record_dp.enabled: opacus computes no"),
        ({"federation": {"personal_modules": ["x"]}, "peft": {"method": "prompt_tuning"}}, "trains one tensor"),
        ({"watermark": {"clients": [0]}, "peft": {"method": "prefix_tuning"}}, "watermark.modules: 'lora_B' selects"),
    ]
    for config, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_config(config)


def test_a_cross_feature_problem_about_an_invalid_field_is_not_computed_from_its_default() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"data": {"partition": {"num_clients": 0}}, "federation": {"clients_per_round": 4}})
    assert [line.split(":")[0] for line in info.value.problems] == ["data.partition.num_clients"]


def test_the_same_problem_in_two_fields_is_reported_for_each_and_a_strategy_problem_once() -> None:
    """Review findings: problems were deduplicated by their text, so a client id outside the
    partitions in two fields printed one line; secure aggregation repeated the strategy's problem."""
    with pytest.raises(ConfigError) as refused:
        build_config({"distill": {"teachers": {9: "x"}, "client_models": {9: "y"}}})
    lines = str(refused.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == ["distill.teachers", "distill.client_models"]
    options = {"clip_norm": 0.5, "noise_multiplier": 1.0, "sample_rate": 0.5}
    with pytest.raises(ConfigError) as refused:
        build_config(
            {"federation": {"strategy": "dp_fedavg", "strategy_options": options}, "secagg": {"enabled": True}}
        )
    assert str(refused.value).count("sample_rate: derived") == 1


@pytest.mark.parametrize("uri", ["http://admin:s3cret@127.0.0.1:5000", "https://token@mlflow.example.org"])
def test_credentials_in_the_tracking_uri_are_refused_and_not_echoed(uri: str) -> None:
    """The config is logged to MLflow and versioned by DVC: a password in it would travel with every run."""
    with pytest.raises(ConfigError, match="tracking.tracking_uri: .*MLFLOW_TRACKING_USERNAME") as refused:
        build_config({"tracking": {"tracking_uri": uri}})
    assert "s3cret" not in str(refused.value) and "token@" not in str(refused.value)
