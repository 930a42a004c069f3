"""Every built-in name of every pluggable family, and where its implementation lives.

The config checks names here without importing torch, peft or any implementation module (the
registry imports an entry the first time it is used); the Prefect form offers these names as
choices. To add a strategy, PEFT method, partition scheme or training objective, write it in
its module and add its name here (docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

from fedtune.core.registry import Registry

STRATEGIES: Registry[Any] = Registry(
    "strategy",
    {
        "fedavg": "fedtune.strategies.fedavg:FedAvg",
        "fedprox": "fedtune.strategies.fedprox:FedProx",
        "scaffold": "fedtune.strategies.scaffold:Scaffold",
        "fedavgm": "fedtune.strategies.server_opt:FedAvgM",
        "fedadagrad": "fedtune.strategies.server_opt:FedAdagrad",
        "fedyogi": "fedtune.strategies.server_opt:FedYogi",
        "fedadam": "fedtune.strategies.server_opt:FedAdam",
        "flexlora": "fedtune.strategies.flexlora:FlexLoRA",
        "median": "fedtune.strategies.robust:CoordinateMedian",
        "trimmed_mean": "fedtune.strategies.robust:TrimmedMean",
        "krum": "fedtune.strategies.robust:Krum",
        "multi_krum": "fedtune.strategies.robust:MultiKrum",
        "norm_bound": "fedtune.strategies.robust:NormBoundedFedAvg",
        "dp_fedavg": "fedtune.privacy.dp_fedavg:DPFedAvg",
    },
)
# Each strategy's options, traits and the federations it refuses, under the same names: light models
# (no torch), so the config checks every strategy without importing it (fedtune/strategies/options.py).
STRATEGY_OPTIONS: Registry[Any] = Registry(
    "strategy",
    {
        "fedavg": "fedtune.strategies.options:StrategyOptions",
        "fedprox": "fedtune.strategies.options:FedProxOptions",
        "scaffold": "fedtune.strategies.options:ScaffoldOptions",
        "fedavgm": "fedtune.strategies.options:FedAvgMOptions",
        "fedadagrad": "fedtune.strategies.options:FedAdagradOptions",
        "fedyogi": "fedtune.strategies.options:FedYogiOptions",
        "fedadam": "fedtune.strategies.options:FedAdamOptions",
        "flexlora": "fedtune.strategies.options:FlexLoRAOptions",
        "median": "fedtune.strategies.options:RobustOptions",
        "trimmed_mean": "fedtune.strategies.options:TrimmedMeanOptions",
        "krum": "fedtune.strategies.options:KrumOptions",
        "multi_krum": "fedtune.strategies.options:MultiKrumOptions",
        "norm_bound": "fedtune.strategies.options:NormBoundOptions",
        "dp_fedavg": "fedtune.privacy.dp_options:DPFedAvgOptions",
    },
)
PEFT_METHODS: Registry[Any] = Registry(
    "PEFT method",
    {
        "lora": "fedtune.model.peft_methods:lora_config",
        "ia3": "fedtune.model.peft_methods:ia3_config",
        "prompt_tuning": "fedtune.model.peft_methods:prompt_tuning_config",
        "p_tuning": "fedtune.model.peft_methods:p_tuning_config",
        "prefix_tuning": "fedtune.model.peft_methods:prefix_tuning_config",
    },
)
PARTITIONERS: Registry[Any] = Registry(
    "partition scheme",
    {
        "iid": "fedtune.data.partition:IID",
        "dirichlet": "fedtune.data.partition:DIRICHLET",
        "natural": "fedtune.data.partition:NATURAL",
        "quantity_skew": "fedtune.data.partition:QUANTITY_SKEW",
    },
)
SKILLS: Registry[Any] = Registry(
    "synthetic skill",
    {
        name: f"fedtune.data.synthetic:{name}"
        for name in ("add", "compare", "uppercase", "parity", "successor", "sort", "last_letter")
    },
)
# schemes that split by a label column (data.partition.column or data.columns.label)
LABELLED_SCHEMES = ("dirichlet", "natural")
OBJECTIVES: Registry[Any] = Registry(
    "training objective",
    {
        "sft": "fedtune.training.objectives:INSTRUCTION_TUNING",
        "pretrain": "fedtune.training.objectives:PRETRAINING",
        "dpo": "fedtune.training.objectives:PREFERENCE_OPTIMIZATION",
    },
)
# Checks that need their feature's own arithmetic (light modules: no torch), run by `fedtune.config.compat`,
# each yielding Problems; reached through the catalog, so the config never imports them (no import cycle).
FEATURE_CHECKS: Registry[Any] = Registry(
    "feature check",
    {
        "strategy": "fedtune.strategies.options:problems",
        "secagg": "fedtune.privacy.secagg.settings:problems",
    },
)
# The optional parts of a client's round (`fedtune.training.client_feature`), in the order their hooks run:
# a narrowed rank and teacher targets shape the data and model, personalization the starting
# point, then the loss terms (the strategy's before the watermark's), compression last.
CLIENT_FEATURES: Registry[Any] = Registry(
    "client feature",
    {
        "hetero_rank": "fedtune.hetero.ranks:HeterogeneousRank",
        "teachers": "fedtune.hetero.teachers:TeacherTargets",
        "record_dp": "fedtune.privacy.record_dp:RecordDP",
        "personalization": "fedtune.hetero.personalization:Personalization",
        "strategy": "fedtune.strategies.client_side:StrategyClient",
        "watermark": "fedtune.privacy.watermark:Watermark",
        "compression": "fedtune.round.compression:Compression",
    },
)
