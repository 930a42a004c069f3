from transformers import AutoTokenizer

from fedtune.data.prompts import DROPPED, IGNORE_INDEX, KEPT, TRUNCATED, collate, encode, fit, prompt_text
from tests.conftest import build_tokenizer

RECORD = {"messages": [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}]}


def test_only_response_tokens_carry_labels(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    item, outcome = encode(tokenizer, RECORD, "Answer with the result only.", 128, "prompt")
    assert item is not None and outcome == KEPT
    labelled = [t for t, label in zip(item["input_ids"], item["labels"], strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled).strip() == "42<|im_end|>"
    prompt_ids = tokenizer(prompt_text(tokenizer, RECORD, "Answer with the result only."), add_special_tokens=False)[
        "input_ids"
    ]
    assert item["input_ids"][: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE_INDEX for label in item["labels"][: len(prompt_ids)])
    assert "system" in tokenizer.decode(item["input_ids"])


def test_each_truncation_policy_keeps_what_it_says_and_reports_it(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    """rel-04 / case 07: an overlong example is cut or dropped by data.truncation, never silently."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    long = {"messages": [{"role": "user", "content": "word " * 40 + "What is 12 + 30?"}, RECORD["messages"][1]]}
    full, outcome = encode(tokenizer, long, None, 512, "prompt")
    assert full is not None and outcome == KEPT
    response = [t for t, label in zip(full["input_ids"], full["labels"], strict=True) if label != IGNORE_INDEX]
    width = len(response) + 12
    kept, outcome = encode(tokenizer, long, None, width, "prompt")  # the prompt loses its start
    assert outcome == TRUNCATED and kept is not None and len(kept["input_ids"]) == width
    assert kept["input_ids"] == full["input_ids"][-width:] and kept["labels"][-len(response) :] == response
    assert encode(tokenizer, long, None, width, "drop") == (None, DROPPED)
    cut, outcome = encode(tokenizer, long, None, len(full["input_ids"]) - 1, "response")  # the response loses its end
    assert outcome == TRUNCATED and cut is not None and cut["input_ids"] == full["input_ids"][:-1]
    assert encode(tokenizer, long, None, 16, "response") == (None, DROPPED)  # the prompt alone is longer


def test_the_prompt_keeps_half_the_window_when_the_response_is_overlong() -> None:
    ids, labels, outcome = fit(list(range(10)), list(range(100, 130)), 16, "prompt")
    assert outcome == TRUNCATED and ids == [2, 3, 4, 5, 6, 7, 8, 9, *range(100, 108)]
    assert labels == [IGNORE_INDEX] * 8 + list(range(100, 108))
    assert fit([1, 2], [3], 16, "drop") == ([1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 3], KEPT)


def test_plain_layout_without_chat_template(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path, with_template=False))
    item, _ = encode(tokenizer, RECORD, None, 128, "prompt")
    assert item is not None
    assert "### Response:" in tokenizer.decode(item["input_ids"])
    labelled = [t for t, label in zip(item["input_ids"], item["labels"], strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled).startswith("42")


def test_collate_left_pads_masks_and_counts_positions() -> None:
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
