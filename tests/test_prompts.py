from transformers import AutoTokenizer

from fedtune.data.prompts import IGNORE_INDEX, collate, encode, prompt_text
from tests.conftest import build_tokenizer

RECORD = {"messages": [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}]}


def test_only_response_tokens_carry_labels(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    item = encode(tokenizer, RECORD, "Answer with the result only.", 128)
    assert item is not None
    labelled = [t for t, label in zip(item["input_ids"], item["labels"], strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled).strip() == "42<|im_end|>"
    prompt_ids = tokenizer(prompt_text(tokenizer, RECORD, "Answer with the result only."), add_special_tokens=False)[
        "input_ids"
    ]
    assert item["input_ids"][: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE_INDEX for label in item["labels"][: len(prompt_ids)])
    assert "system" in tokenizer.decode(item["input_ids"])


def test_truncation_and_fully_truncated_responses(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    full = encode(tokenizer, RECORD, None, 128)
    assert full is not None
    cut = encode(tokenizer, RECORD, None, len(full["input_ids"]) - 1)
    assert cut is not None and len(cut["input_ids"]) == len(full["input_ids"]) - 1
    assert encode(tokenizer, RECORD, None, 4) is None  # the prompt alone is longer


def test_plain_layout_without_chat_template(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path, with_template=False))
    item = encode(tokenizer, RECORD, None, 128)
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
