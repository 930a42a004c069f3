"""What a run is: the config's sections and field rules (`schema`), and the cross-feature rules
(`compat`); neither imports torch. The public names are importable from here."""

from fedtune.config.schema import ConfigError, FedConfig, apply_overrides, build_config, load_config

__all__ = ["ConfigError", "FedConfig", "apply_overrides", "build_config", "load_config"]
