"""Causal-LM loss on response tokens only, without computing logits for the prompt.

The output layer of a small LLM is a large share of its compute (SmolLM2-135M: 28M of 135M
parameters, applied per position) and its full logits tensor dominates memory. Batches are
left-padded, so every response ends in the last column: the model is asked for logits of
the last `window` positions only (transformers' `logits_to_keep`), which cover every label.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

import torch
from torch import nn

from fedtune.data.prompts import IGNORE_INDEX


@cache
def _accepts_logits_to_keep(model_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters


def _base_type(model: nn.Module) -> type:
    get_base = getattr(model, "get_base_model", None)
    return type(get_base() if get_base is not None else model)


def response_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of label tokens) for a left-padded batch."""
    labels = batch["labels"]
    width = labels.shape[1]
    labelled = labels != IGNORE_INDEX
    first = int(torch.where(labelled.any(dim=1), labelled.float().argmax(dim=1), width).min())
    keep = min(width, width - first + 1)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    if _accepts_logits_to_keep(_base_type(model)):
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        logits = model(**inputs).logits[:, -keep:]
    targets = labels[:, width - keep + 1 :]
    total = nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, int((targets != IGNORE_INDEX).sum())
