"""Generation and scoring follow the model, not assumptions (issue 13, kind 3; cases 02 and 06).

Four tokenizers in the styles of the families users bring: a Llama-3-like template whose turns
end with <|eot_id|> while the tokenizer's eos is <|end_of_text|> (as Llama 3 Instruct shipped,
with both listed in generation_config.json), a Qwen-like ChatML, a Gemma-like template that
raises on a system message, and a base model without a chat template. Each gets a scripted
"bigram" model (next token a fixed function of the current one) that answers `7`, closes its turn
with the family's end-of-turn token and then starts a `user` turn, forever, so exact match is 1.0
only if generation stops at the model's own stop tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from fedtune.config.schema import build_config
from fedtune.data.prompts import IGNORE_INDEX, KEPT, encode, end_of_turn_id, prompt_text
from fedtune.model.loading import load_base_model, load_tokenizer
from fedtune.training.evaluation import exact_match, stop_token_ids
from fedtune.training.tokenized import encode_counted
from tests.conftest import QWEN, Family, build_tokenizer

LLAMA3 = Family(
    ("<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "<|begin_of_text|>",
    "<|end_of_text|>",
    None,
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
)
GEMMA = Family(
    ("<unk>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
    "<bos>",
    "<eos>",
    "<eos>",
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
)
BASE = Family(("<unk>", "<s>", "</s>"), "<s>", "</s>", None, None)
# family: (tokenizer style, end-of-turn token, the eos ids generation_config.json lists)
FAMILIES = {
    "llama3": (LLAMA3, "<|eot_id|>", ["<|end_of_text|>", "<|eot_id|>"]),
    "qwen": (QWEN, "<|im_end|>", ["<|im_end|>"]),
    "gemma": (GEMMA, "<end_of_turn>", ["<eos>"]),  # the end of turn only from the template
    "base": (BASE, "</s>", ["</s>"]),
}
RECORDS = [
    {"messages": [{"role": "user", "content": f"What is {i} + {7 - i}?"}, {"role": "assistant", "content": "7"}]}
    for i in range(6)
]


def _scripted_model(directory: Path, family: str) -> Path:
    """One-hot embeddings, zeroed blocks (the residual stream carries the token through), and an
    output layer that maps the prompt's last token -> `7` -> end of turn -> `user` -> `7` ..."""
    style, end, listed = FAMILIES[family]
    build_tokenizer(directory, family=style)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    vocab = len(tokenizer)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=vocab,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    last = tokenizer(prompt_text(tokenizer, RECORDS[0], None), add_special_tokens=False)["input_ids"][-1]
    seven, user = (tokenizer(text, add_special_tokens=False)["input_ids"][0] for text in ("7", "user"))
    eot = tokenizer.convert_tokens_to_ids(end)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        model.model.norm.weight.fill_(1.0)
        for current, following in ((last, seven), (seven, eot), (eot, user), (user, seven)):
            model.lm_head.weight[following, current] = 1.0
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.convert_tokens_to_ids(listed))
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generation_stops_at_the_models_own_stop_tokens_in_every_family(tmp_path, family) -> None:  # type: ignore[no-untyped-def]
    directory = _scripted_model(tmp_path / family, family)
    config = build_config({"model": {"name_or_path": str(directory), "source": None, "dtype": "float32"}})
    tokenizer, model = load_tokenizer(config.model), load_base_model(config.model)
    end = tokenizer.convert_tokens_to_ids(FAMILIES[family][1])
    assert end_of_turn_id(tokenizer) == end and end in stop_token_ids(model, tokenizer)
    scored = exact_match(
        model, tokenizer, RECORDS, system_prompt="Answer with the result only.", max_new_tokens=8, batch_size=4
    )
    assert scored["accuracy"] == 1.0, scored["samples"]
    example, outcome = encode(tokenizer, RECORDS[0], "Answer with the result only.", 64, "prompt")
    labelled = [t for t in example["labels"] if t != IGNORE_INDEX]  # what training teaches: the answer, then stop
    assert outcome == KEPT and labelled[:2] == [tokenizer.convert_tokens_to_ids("7"), end]


def test_a_template_without_a_system_role_gets_the_system_text_in_the_first_user_turn(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Case 06: Gemma's template raises on a system message; the run must not fail mid-flow."""
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path, family=GEMMA))
    text = prompt_text(tokenizer, RECORDS[0], "Answer with the result only.")
    assert text == (
        "<bos><start_of_turn>user\nAnswer with the result only.\n\nWhat is 0 + 7?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_a_conversation_the_template_refuses_otherwise_is_a_named_input_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedtune.data.prompts import TemplateRefused

    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path, family=QWEN))
    tokenizer.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    record = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"},
        ]
    }
    with pytest.raises(TemplateRefused, match=r"model.name_or_path: .* \(roles user, user\): Conversation roles must"):
        encode(tokenizer, record, None, 64, "prompt")
    config = build_config({"data": {"system_prompt": None}})
    with pytest.raises(TemplateRefused, match="the record that begins 'a'"):  # findable in a large file
        encode_counted(config, tokenizer, [RECORDS[0], record])
