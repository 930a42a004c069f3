"""Causal-LM loss on response tokens only, without computing logits for the prompt.

Batches are left-padded, so every response ends in the last column and the labels all lie in
the last `window` positions. We run the decoder body, then the output layer on that window
only (a contiguous copy: transformers' own `logits_to_keep` slices without copying, which
takes a slow bf16 matmul path on CPU and measured 40% slower than full logits here). On
SmolLM2-135M this makes a training step ~15% faster than the full-logits loss and avoids the
(batch x length x 49k) logits tensor. Models where logits are not just `head(hidden)` (prompt
learning prepends virtual tokens; Gemma-style soft-capping) use the full logits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedtune.data.prompts import IGNORE_INDEX


def _body_and_head(model: Any) -> tuple[Any, Any] | None:
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "final_logit_softcapping", None):
        return None
    body, head = base.get_decoder(), base.get_output_embeddings()
    if body is None or head is None or body is base:
        return None
    return body, head


def on_model_device(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The batch's tensors where the model's weights are (batches are built on the CPU)."""
    device = next(model.parameters()).device
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def window_logits(model: Any, batch: dict[str, Any], window: int) -> torch.Tensor:
    """Logits of the last `window` positions of a left-padded batch."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    parts = _body_and_head(model)
    if parts is None:
        return model(**inputs).logits[:, -window:]
    body, head = parts
    hidden = body(**inputs).last_hidden_state
    return head(hidden[:, -window:].contiguous())


def _window(labels: torch.Tensor) -> int:
    """Columns of a left-padded batch from the one before its first label to the end."""
    width = labels.shape[1]
    labelled = labels != IGNORE_INDEX
    first = int(torch.where(labelled.any(dim=1), labelled.float().argmax(dim=1), width).min())
    return min(width, width - first + 1)


def target_count(labels: torch.Tensor) -> int:
    """How many label tokens the loss of this batch predicts (its token losses' denominator)."""
    return int((labels[:, labels.shape[1] - _window(labels) + 1 :] != IGNORE_INDEX).sum())


def response_logits(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) of the response window: logits[:, i] predict targets[:, i]."""
    window = _window(batch["labels"])  # from the batch as built, before it moves to the model's device
    batch = on_model_device(model, batch)
    labels = batch["labels"]
    logits = window_logits(model, batch, window)
    return logits[:, :-1], labels[:, labels.shape[1] - window + 1 :]


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses (0 where unlabelled) and the label mask."""
    losses = nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses.view(targets.shape), targets != IGNORE_INDEX


def _token_losses(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return token_losses(*response_logits(model, batch))


def response_loss(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of label tokens) for a left-padded batch."""
    losses, mask = _token_losses(model, batch)
    return losses.sum(), int(mask.sum())


def per_example_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Each example's mean token loss: DP-SGD clips gradients example by example."""
    losses, mask = _token_losses(model, batch)
    return losses.sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def sequence_log_probs(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens (DPO's log pi(y|x))."""
    losses, _ = _token_losses(model, batch)
    return -losses.sum(dim=1)
