from pathlib import Path

import pytest
import yaml

from fedtune.config import ConfigError, FedConfig, apply_overrides, build_config, load_config


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
    with pytest.raises(ConfigError, match="clients_per_round .* exceeds data.partition.num_clients"):
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
