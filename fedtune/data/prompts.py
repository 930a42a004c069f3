"""Turn chat records into token ids with the tokenizer's chat template; loss on the response only.

The prompt is everything before the last (assistant) message, rendered with the generation
prompt; the label ids of the prompt are -100 so the loss sees only the response and its
end-of-turn marker. Tokenizers without a chat template get a plain instruction layout.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.data.loading import Record

IGNORE_INDEX = -100
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    template = None if tokenizer.chat_template else PLAIN_TEMPLATE
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
    )
    return str(text)


def prompt_messages(record: Record, system_prompt: str | None) -> list[dict[str, str]]:
    """The conversation up to (not including) the response to learn or to generate."""
    messages = list(record["messages"][:-1])
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def prompt_text(tokenizer: PreTrainedTokenizerBase, record: Record, system_prompt: str | None) -> str:
    return _render(tokenizer, prompt_messages(record, system_prompt), generation_prompt=True)


def reference_answer(record: Record) -> str:
    return str(record["messages"][-1]["content"]).strip()


def encode(
    tokenizer: PreTrainedTokenizerBase, record: Record, system_prompt: str | None, max_length: int
) -> dict[str, list[int]] | None:
    """input_ids/labels truncated to max_length; None when truncation leaves no response token."""
    prompt = prompt_text(tokenizer, record, system_prompt)
    full = _render(tokenizer, [*prompt_messages(record, system_prompt), record["messages"][-1]], False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside the full conversation")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Left-pad a batch, so every row's response ends in the last column (see `losses`).

    Padding is masked out of attention and loss; position ids count real tokens only, so a
    row's positions do not depend on how much padding its batch needed.
    """
    width = max(len(item["input_ids"]) for item in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        ids[row, width - n :] = torch.tensor(item["input_ids"])
        labels[row, width - n :] = torch.tensor(item["labels"])
        mask[row, width - n :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions}
