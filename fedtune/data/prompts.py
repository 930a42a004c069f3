"""Turn chat records into token ids with the tokenizer's chat template; loss on the response only.

The prompt is everything before the last (assistant) message, rendered with the generation
prompt; the label ids of the prompt are -100 so the loss sees only the response and its
end-of-turn marker. Tokenizers without a chat template get a plain instruction layout.
"""

from __future__ import annotations

from typing import Any

import torch
from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from fedtune.core.errors import InputError
from fedtune.data.loading import Record

IGNORE_INDEX = -100
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


class TemplateRefused(InputError):
    """The model's chat template cannot render a conversation of the data."""


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """The conversation as the model's chat template writes it (a plain instruction layout without one).

    A template that refuses a system message (Gemma's raises "System role not supported") gets the
    system text folded into the first user turn, as llama.cpp does (ggml-org/llama.cpp#5665); any
    other refusal is a TemplateRefused naming the model and the roles of the conversation."""
    template = None if tokenizer.chat_template else PLAIN_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
        )
    except TemplateError as error:
        if len(messages) > 1 and messages[0]["role"] == "system" and messages[1]["role"] == "user":
            folded = {"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
            return _render(tokenizer, [folded, *messages[2:]], generation_prompt)
        roles = ", ".join(m["role"] for m in messages)
        raise TemplateRefused(
            f"model.name_or_path: the chat template of {tokenizer.name_or_path} refuses a conversation of the data "
            f"(roles {roles}): {error}"
        ) from None
    return str(text)


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token the chat template closes an assistant turn with (ChatML's <|im_end|>, Llama 3's
    <|eot_id|>, Gemma's <end_of_turn>, the eos of the plain layout), when it is a special token."""
    marker = "\x00fedtune-answer\x00"
    text = _render(tokenizer, [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}], False)
    after = text.split(marker, 1)[1] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids:
        return None
    added = tokenizer.added_tokens_decoder.get(ids[0])  # Llama 3's <|eot_id|> is special here, not in the map
    return ids[0] if ids[0] in tokenizer.all_special_ids or (added is not None and added.special) else None


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


KEPT, TRUNCATED, DROPPED = "kept", "truncated", "dropped"  # what tokenization did to one example


def fit(prompt: list[int], response: list[int], max_length: int, truncation: str) -> tuple[list[int], list[int], str]:
    """(input_ids, labels, outcome) of one example cut to `max_length` tokens by `data.truncation`.

    `prompt` cuts the prompt's start (keeping its end, where the question is: trl's `keep_end`)
    so that the whole response fits, but keeps at least half the window of prompt; `response`
    cuts the end of prompt+response; `drop` keeps only examples that fit. The outcome is
    DROPPED when no response token is left (labels all -100), and the ids are then empty."""
    if len(prompt) + len(response) <= max_length:
        return prompt + response, [IGNORE_INDEX] * len(prompt) + response, KEPT
    if truncation == "drop":
        return [], [], DROPPED
    if truncation == "prompt":
        keep = max(max_length - len(response), min(len(prompt), max_length // 2))
        prompt = prompt[len(prompt) - keep :]
    ids = (prompt + response)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return [], [], DROPPED
    return ids, labels, TRUNCATED


def encode(
    tokenizer: PreTrainedTokenizerBase, record: Record, system_prompt: str | None, max_length: int, truncation: str
) -> tuple[dict[str, list[int]] | None, str]:
    """(input_ids/labels or None when dropped, outcome): the record rendered and cut by `fit`."""
    prompt = prompt_text(tokenizer, record, system_prompt)
    full = _render(tokenizer, [*prompt_messages(record, system_prompt), record["messages"][-1]], False)
    if not full.startswith(prompt):
        raise TemplateRefused(
            f"model.name_or_path: the chat template of {tokenizer.name_or_path} renders the prompt differently inside "
            "the full conversation, so the response's tokens cannot be told apart"
        )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    input_ids, labels, outcome = fit(prompt_ids, response_ids, max_length, truncation)
    return (None if outcome == DROPPED else {"input_ids": input_ids, "labels": labels}), outcome


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
