"""The mentee route of a heterogeneous federation (FATE-LLM's FedHeteroLLM).

Members own different models. All of them train one shared small architecture, the *mentee*
(`model.name_or_path`), with PEFT, and the server aggregates the mentee adapters with any
strategy; a client listed in `distill.teachers` also distills its own model into the mentee on
its local data: its model's top-k tempered distribution at every response token is attached to
the training examples, and the client's loss mixes the cross-entropy with the distillation loss
(`train.distill_alpha`, `train.distill_temperature`). A teacher is a model folder, or a peft adapter
folder (the member's own model as it tuned it). Teachers and mentee share a tokenizer here;
models with different tokenizers exchange aligned logits instead (flows/knowledge_transfer.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peft import PeftModel

from fedtune.config.schema import FedConfig
from fedtune.core.errors import InputError
from fedtune.model.loading import check_model, load_base_model, load_tokenizer
from fedtune.training.client_feature import ClientFeature, ClientRound
from fedtune.training.distillation import Target, attach, tempered, top_k


def _teacher_section(cfg: FedConfig, path: str) -> Any:
    """The teacher's base model; a teacher given as a peft adapter folder is its base plus it."""
    adapter = Path(path) / "adapter_config.json"
    if adapter.exists():
        path = json.loads(adapter.read_text())["base_model_name_or_path"]
    return cfg.model.model_copy(update={"name_or_path": path, "source": None})


def _teacher(cfg: FedConfig, path: str) -> Any:
    base = load_base_model(_teacher_section(cfg, path))
    return PeftModel.from_pretrained(base, path) if (Path(path) / "adapter_config.json").exists() else base


def check_teachers(cfg: FedConfig) -> None:
    """Every teacher exists and tokenizes like the mentee; one error names each that does not."""
    if not cfg.distill.teachers:
        return
    mentee = load_tokenizer(cfg.model).get_vocab()
    problems = []
    for client, path in sorted(cfg.distill.teachers.items()):
        try:
            check_model(_teacher_section(cfg, path))
            vocabulary = load_tokenizer(_teacher_section(cfg, path)).get_vocab()
        except InputError as error:
            problems.append(f"distill.teachers[{client}]: {error}")
            continue
        if vocabulary != mentee:
            problems.append(
                f"distill.teachers[{client}]: {path} has a different tokenizer than the mentee; the mentee route needs "
                "the same one (models with different tokenizers: the knowledge-transfer flow aligns their logits)"
            )
    if problems:
        raise InputError("; ".join(problems))


def with_teacher_targets(
    cfg: FedConfig, client: int, examples: list[dict[str, Any]], pad_id: int
) -> list[dict[str, Any]]:
    """`examples` carrying the client's own model's top-k at each response token."""
    teacher = _teacher(cfg, cfg.distill.teachers[client])
    picks = top_k(teacher, examples, k=cfg.distill.top_k, pad_id=pad_id, batch_size=cfg.eval.batch_size)
    temperature = cfg.train.distill_temperature
    targets: list[list[Target]] = [[(ids, tempered(values, temperature)) for ids, values in rows] for rows in picks]
    return attach(examples, targets)


class TeacherTargets(ClientFeature):
    """The mentee route: a teacher client's own model labels its train examples with its top-k
    next-token probabilities, which the shared mentee learns from beside the cross-entropy."""

    # the teacher is a model folder, which tests/test_combinations.py fills with the tiny model
    examples = {"teacher targets": {"distill": {"teachers": {0: "<teacher model folder>"}}}}

    @classmethod
    def enabled(cls, cfg: FedConfig, client: int) -> bool:
        return client in cfg.distill.teachers

    def prepare_data(self, r: ClientRound) -> None:
        r.train = with_teacher_targets(r.cfg, r.client, r.train, r.tokenizer.pad_token_id)
