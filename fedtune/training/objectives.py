"""Training objectives: how a client's records become examples, and what loss a batch of them has.

`train.objective` picks one from the registry: `sft` (instruction tuning, loss on the response),
`dpo` (direct preference optimization on (prompt, chosen, rejected) pairs, OpenFedLLM's federated
value alignment) and `pretrain` (continued pre-training: next-token loss on every token of raw
text). The training loop, the strategies and the evaluation call these and never branch on the
name, so federated DPO and pre-training get every strategy, PEFT method and privacy option that
SFT has (except DP-SGD for DPO, refused by `fedtune.config.compat`).

DPO is written here rather than run through trl's DPOTrainer because the federated client owns
its training loop (strategy loss terms, per-round budgets, DP); the loss is trl's "sigmoid" DPO
loss, and tests/test_objectives.py checks it against trl's DPOTrainer on the same pairs. The
reference policy is the frozen base model (the adapter disabled), as trl does for a new PEFT
adapter: with a fresh adapter that is exactly the round-0 model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F  # noqa: N812 (the conventional name)
from transformers import PreTrainedTokenizerBase

from fedtune.data.loading import Record
from fedtune.data.prompts import DROPPED, KEPT, TRUNCATED, collate, encode
from fedtune.training.distillation import KD_IDS, kd_loss, target_tensors
from fedtune.training.losses import response_logits, sequence_log_probs, target_count, token_losses

if TYPE_CHECKING:
    from fedtune.config.schema import DataSection, TrainSection

Example = dict[str, list[int]]


class Objective:
    """Instruction tuning: one example per record, loss on the response tokens."""

    scores_answers = True  # records carry a reference answer that generation can be scored against
    pairs = False  # examples are (chosen, rejected) pairs

    def encode(
        self, tokenizer: PreTrainedTokenizerBase, record: Record, data: DataSection
    ) -> tuple[list[Example], str]:
        """(examples, outcome): what one record becomes, and whether tokenization kept, truncated or
        dropped it (`fedtune.data.prompts.fit`, counted in the partition report)."""
        example, outcome = encode(tokenizer, record, data.system_prompt, data.max_length, data.truncation)
        return ([] if example is None else [example]), outcome

    def units(self, examples: list[Example], pad_id: int) -> int:
        """What `loss` is a mean over: the batch's label tokens. Gradient accumulation weighs each
        micro-batch's mean by its units, so that accumulating is the step of the big batch."""
        return target_count(collate(examples, pad_id)["labels"])

    def loss(self, model: Any, examples: list[Example], pad_id: int, train: TrainSection) -> tuple[torch.Tensor, int]:
        """(mean loss to minimise, tokens the batch processed). Examples that carry a teacher's
        targets (distillation) mix the cross-entropy with the distillation loss."""
        batch = collate(examples, pad_id)
        logits, targets = response_logits(model, batch)
        losses, mask = token_losses(logits, targets)
        loss = losses.sum() / max(int(mask.sum()), 1)
        if KD_IDS in examples[0]:
            ids, probs = target_tensors(examples)
            distilled = kd_loss(logits[mask], ids, probs, train.distill_temperature)
            loss = (1 - train.distill_alpha) * loss + train.distill_alpha * distilled
        return loss, int(batch["attention_mask"].sum())


class Pretraining(Objective):
    """Next-token loss on all of a document's tokens, in chunks of `data.max_length`.

    Documents are not packed together: a chunk never spans two documents, so no attention mask
    tricks are needed and a row's loss is its own document's."""

    scores_answers = False

    def encode(
        self, tokenizer: PreTrainedTokenizerBase, record: Record, data: DataSection
    ) -> tuple[list[Example], str]:
        """A document is chunked, never cut: every token is kept."""
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        chunks = [ids[start : start + data.max_length] for start in range(0, len(ids), data.max_length)]
        return [{"input_ids": chunk, "labels": list(chunk)} for chunk in chunks if len(chunk) > 1], KEPT


class PreferenceOptimization(Objective):
    """DPO: the chosen response is the example (its loss is the SFT loss on it); the rejected one rides along."""

    pairs = True

    def encode(
        self, tokenizer: PreTrainedTokenizerBase, record: Record, data: DataSection
    ) -> tuple[list[Example], str]:
        """A pair is what its worse half is: dropped if either response is, truncated if either is."""
        rejected = {
            **record,
            "messages": [*record["messages"][:-1], {"role": "assistant", "content": record["rejected"]}],
        }
        chosen_ids, chosen = encode(tokenizer, record, data.system_prompt, data.max_length, data.truncation)
        rejected_ids, other = encode(tokenizer, rejected, data.system_prompt, data.max_length, data.truncation)
        outcome = next(o for o in (DROPPED, TRUNCATED, KEPT) if o in (chosen, other))
        if chosen_ids is None or rejected_ids is None:
            return [], outcome
        pair = {
            **chosen_ids,
            "rejected_input_ids": rejected_ids["input_ids"],
            "rejected_labels": rejected_ids["labels"],
        }
        return [pair], outcome

    def units(self, examples: list[Example], pad_id: int) -> int:
        """DPO's loss is a mean over pairs."""
        return len(examples)

    def loss(self, model: Any, examples: list[Example], pad_id: int, train: TrainSection) -> tuple[torch.Tensor, int]:
        margins, tokens = preference_margins(model, examples, pad_id)
        return dpo_losses(margins, train.dpo_beta).mean(), tokens


INSTRUCTION_TUNING = Objective()
PRETRAINING = Pretraining()
PREFERENCE_OPTIMIZATION = PreferenceOptimization()


def preference_margins(model: Any, examples: list[Example], pad_id: int) -> tuple[torch.Tensor, int]:
    """Per pair: (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)).

    Chosen and rejected go through the model in one batch; the reference is the same model with
    its adapter disabled, without gradients."""
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    rows += [{"input_ids": e["rejected_input_ids"], "labels": e["rejected_labels"]} for e in examples]
    batch = collate(rows, pad_id)
    policy = sequence_log_probs(model, batch)
    with torch.no_grad(), model.disable_adapter():
        reference = sequence_log_probs(model, batch)
    ratios = policy - reference
    n = len(examples)
    return ratios[:n] - ratios[n:], int(batch["attention_mask"].sum())


def dpo_losses(margins: torch.Tensor, beta: float) -> torch.Tensor:
    """trl's `sigmoid` DPO loss per pair (Rafailov et al. 2023, eq. 7)."""
    return -F.logsigmoid(beta * margins)
