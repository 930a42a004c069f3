"""Evaluate one adapter the same way for every method, so federated and baselines compare."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune.config.schema import FedConfig
from fedtune.core.catalog import OBJECTIVES
from fedtune.data.partition import read_split
from fedtune.model.adapters import AdapterState
from fedtune.model.builder import build_peft_model, tokenizer_for
from fedtune.training.evaluation import exact_match, loss_and_perplexity, preference_metrics
from fedtune.training.tokenized import encode_records, load_encoded


def evaluate_adapter(
    cfg: FedConfig, adapter: AdapterState | str | Path, *, generation: bool = True, client_val: bool = True
) -> dict[str, Any]:
    """Test loss/perplexity, each client's val loss, and exact match on the held-out sample.

    With preference pairs (DPO), also DPO's loss, reward accuracy and margin;
    the test loss is then the loss on the chosen responses. Raw text gets no exact match."""
    tokenizer = tokenizer_for(cfg)
    model = build_peft_model(cfg, adapter)
    pad = tokenizer.pad_token_id
    test_records = read_split(cfg.data.partitions_dir, None, "test")
    test_data = encode_records(cfg, tokenizer, test_records)
    test = loss_and_perplexity(model, test_data, batch_size=cfg.eval.batch_size, pad_id=pad)
    metrics: dict[str, Any] = {"test_loss": test["loss"], "test_perplexity": test["perplexity"]}
    objective = OBJECTIVES.get(cfg.train.objective)
    if objective.pairs:
        preference = preference_metrics(
            model, test_data, beta=cfg.train.dpo_beta, batch_size=cfg.eval.batch_size, pad_id=pad
        )
        metrics.update({f"test_{name}": value for name, value in preference.items()})
    if client_val:
        vals = [
            loss_and_perplexity(
                model, load_encoded(cfg, tokenizer, c, "val"), batch_size=cfg.eval.batch_size, pad_id=pad
            )["loss"]
            for c in range(cfg.data.partition.num_clients)
        ]
        scored = [v for v in vals if v is not None]  # a client whose val set kept no example has no value
        metrics["client_val_loss"] = vals
        metrics["val_loss"] = sum(scored) / len(scored) if scored else None
    if generation and cfg.eval.generation_samples > 0 and objective.scores_answers:
        em = exact_match(
            model,
            tokenizer,
            test_records[: cfg.eval.generation_samples],
            system_prompt=cfg.data.system_prompt,
            max_new_tokens=cfg.eval.max_new_tokens,
            batch_size=cfg.eval.batch_size,
            answer_pattern=cfg.eval.answer_pattern,
        )
        metrics["test_accuracy"] = em["accuracy"]
        metrics["test_accuracy_per_label"] = em["per_label"]
        metrics["samples"] = em["samples"]
    return metrics
