"""Knowledge distillation between models that need not share an architecture or a tokenizer.

What travels is a *message*: for each predicted token of a text, where that token starts in the
text (a character offset) and the top-k logits of the sender's model there. A receiver with a
different tokenizer lines the message up with its own tokens by those offsets and maps the
top-k token ids into its vocabulary by each token's decoded text; entries without a counterpart
are dropped and the rest renormalized. FedMKT aligns token sequences by minimum edit distance
between token strings; fast tokenizers report exact character spans, which makes the alignment
exact where tokens start at the same character and leaves the rest out of the loss.

The receiver's loss on an example that carries targets (`KD_IDS`, `KD_PROBS`, one row per
labelled token) is (1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher_T || student_T)
(Hinton et al. 2015), in `objectives`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F  # noqa: N812 (the conventional name)
from transformers import PreTrainedTokenizerBase

from fedtune.core.errors import InputError
from fedtune.data.prompts import IGNORE_INDEX, collate
from fedtune.training.losses import response_logits

KD_IDS, KD_PROBS = "kd_ids", "kd_probs"
Target = tuple[list[int], list[float]] | None  # one labelled token's teacher top-k, or none aligned


def kd_loss(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * cross-entropy of the student's tempered distribution against sparse teacher targets
    (the KL up to the teacher's entropy, a constant); rows whose probs are all 0 carry no target."""
    ids, probs = ids.to(logits.device), probs.to(logits.device)
    log_q = F.log_softmax(logits.float() / temperature, dim=-1).gather(1, ids)
    has = probs.sum(dim=1) > 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    return -(temperature**2) * (probs * log_q).sum(dim=1)[has].mean()


def target_tensors(examples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's targets as (ids, probs) of shape (labelled tokens, widest row), zero-padded."""
    rows = [row for e in examples for row in zip(e[KD_IDS], e[KD_PROBS], strict=True)]
    k = max((len(row_ids) for row_ids, _ in rows), default=1) or 1
    ids = torch.zeros((len(rows), k), dtype=torch.long)
    probs = torch.zeros((len(rows), k))
    for i, (row_ids, row_probs) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        probs[i, : len(row_probs)] = torch.tensor(row_probs)
    return ids, probs


def _labelled(example: dict[str, list[int]]) -> list[int]:
    """Own indices of the tokens the loss predicts (index 0 has no prediction)."""
    return [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX and i > 0]


@torch.no_grad()
def top_k(
    model: Any, examples: list[dict[str, Any]], *, k: int, pad_id: int, batch_size: int
) -> list[list[tuple[list[int], list[float]]]]:
    """Per example, per labelled token: (top-k ids, their logits) of `model`."""
    vocab = model.get_output_embeddings().weight.shape[0]
    if k > vocab:
        raise InputError(f"distill.top_k: {k} is larger than the vocabulary ({vocab} tokens)")
    model.eval()
    out: list[list[tuple[list[int], list[float]]]] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        for e in chunk:
            if e["labels"] and e["labels"][0] != IGNORE_INDEX:
                raise ValueError("distillation targets need an unlabelled first token (a prompt)")
        logits, targets = response_logits(model, collate(chunk, pad_id))
        for row in range(len(chunk)):
            picked = logits[row][targets[row] != IGNORE_INDEX].float()
            values, ids = picked.topk(k, dim=-1)
            out.append(list(zip(ids.tolist(), values.tolist(), strict=True)))
    return out


def tempered(logits: Sequence[float], temperature: float) -> list[float]:
    return torch.softmax(torch.tensor(logits) / temperature, dim=0).tolist()


def attach(examples: list[dict[str, Any]], targets: list[list[Target]]) -> list[dict[str, Any]]:
    """Copies of `examples` carrying their teacher targets (missing ones as empty rows)."""
    out = []
    for example, rows in zip(examples, targets, strict=True):
        if len(rows) != len(_labelled(example)):
            raise ValueError("one target row per labelled token")
        out.append(
            {
                **example,
                KD_IDS: [row[0] if row else [] for row in rows],
                KD_PROBS: [row[1] if row else [] for row in rows],
            }
        )
    return out


@dataclass(frozen=True)
class TextExample:
    """A text whose tokens from `answer_start` on are predicted (the same text for every tokenizer)."""

    text: str
    answer_start: int


def encode_text(tokenizer: PreTrainedTokenizerBase, example: TextExample, max_length: int) -> dict[str, Any]:
    """input_ids/labels as for training, plus each token's starting character (for alignment)."""
    if not tokenizer.is_fast:
        raise InputError(f"{type(tokenizer).__name__}: aligning tokenizers needs a fast tokenizer (character offsets)")
    encoded = tokenizer(example.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"][:max_length]
    starts = [span[0] for span in encoded["offset_mapping"]][:max_length]
    labels = [
        token if start >= example.answer_start and i > 0 else IGNORE_INDEX
        for i, (token, start) in enumerate(zip(ids, starts, strict=True))
    ]
    return {"input_ids": ids, "labels": labels, "starts": starts}


def message(encoded: list[dict[str, Any]], picks: list[list[tuple[list[int], list[float]]]]) -> list[dict[str, list]]:
    """What a client sends for each text: its predicted tokens' starts and top-k (ids, logits)."""
    out = []
    for example, rows in zip(encoded, picks, strict=True):
        starts = [example["starts"][i] for i in _labelled(example)]
        out.append(
            {
                "starts": starts,
                "ids": [list(ids) for ids, _ in rows],
                "logits": [list(values) for _, values in rows],
            }
        )
    return out


def own_tokens(encoded: list[dict[str, Any]]) -> list[dict[str, list]]:
    """A message whose "top-1" is the sender's own next token: how well two tokenizations align."""
    return message(encoded, [[([example["input_ids"][i]], [0.0]) for i in _labelled(example)] for example in encoded])


def targets_bytes(targets: list[list[Target]]) -> int:
    """On the wire back to a receiver: an int32 id and a float32 probability per entry, per token."""
    return sum(4 + 8 * len(row[0]) for rows in targets for row in rows if row is not None)


def message_bytes(messages: list[dict[str, list]]) -> int:
    """On the wire: an int32 start per token, an int32 id and a float32 logit per top-k entry."""
    return sum(4 * len(m["starts"]) + 8 * sum(len(row) for row in m["ids"]) for m in messages)


class VocabularyBridge:
    """Maps a sender's token ids to a receiver's by the tokens' decoded text."""

    def __init__(self, sender: PreTrainedTokenizerBase, receiver: PreTrainedTokenizerBase) -> None:
        self.sender = sender
        self.identity = sender.get_vocab() == receiver.get_vocab()
        self.lookup: dict[str, int] = {}
        if not self.identity:
            for token_id in sorted(receiver.get_vocab().values(), reverse=True):  # lowest id wins
                self.lookup[receiver.decode([token_id])] = token_id

    def __call__(self, token_id: int) -> int | None:
        if self.identity:
            return token_id
        return self.lookup.get(self.sender.decode([token_id]))


def align(
    sent: dict[str, list], bridge: VocabularyBridge, receiver_example: dict[str, Any], temperature: float
) -> list[Target]:
    """The sender's tempered top-k at each of the receiver's predicted tokens, where both tokenizers
    start a token at the same character; None where they do not or no top-k entry maps."""
    by_start = {s: (ids, logits) for s, ids, logits in zip(sent["starts"], sent["ids"], sent["logits"], strict=True)}
    rows: list[Target] = []
    for i in _labelled(receiver_example):
        found = by_start.get(receiver_example["starts"][i])
        if found is None:
            rows.append(None)
            continue
        mapped: dict[int, float] = {}
        for token_id, p in zip(found[0], tempered(found[1], temperature), strict=True):
            target = bridge(token_id)
            if target is not None:
                mapped[target] = mapped.get(target, 0.0) + p
        total = sum(mapped.values())
        rows.append((list(mapped), [p / total for p in mapped.values()]) if total > 0 else None)
    return rows


def fuse(candidates: list[list[Target]]) -> list[Target]:
    """Per token, the mean of the senders' aligned distributions (over the senders that align)."""
    fused: list[Target] = []
    for per_sender in zip(*candidates, strict=True):
        present = [c for c in per_sender if c is not None]
        if not present:
            fused.append(None)
            continue
        mixed: dict[int, float] = {}
        for ids, probs in present:
            for token_id, p in zip(ids, probs, strict=True):
                mixed[token_id] = mixed.get(token_id, 0.0) + p / len(present)
        fused.append((list(mixed), list(mixed.values())))
    return fused


def aligned_share(targets: list[list[Target]]) -> float:
    """Share of the receiver's predicted tokens that got a target (alignment coverage)."""
    rows = [row for example in targets for row in example]
    return sum(row is not None for row in rows) / max(len(rows), 1)
