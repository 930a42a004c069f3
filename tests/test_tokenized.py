"""What tokenization drops is counted (issue 13, kind 6; cases 07 and rel-04)."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune.config.schema import build_config
from fedtune.data.loading import load_records
from fedtune.data.partition import Partitions, split_records, write_partitions
from fedtune.model.builder import initial_adapter_state
from fedtune.model.loading import load_tokenizer
from fedtune.training.assessment import evaluate_adapter
from fedtune.training.evaluation import loss_and_perplexity
from fedtune.training.tokenized import UnusableData, load_encoded, partition_records
from tests.conftest import tiny_overrides

LOG = "Shift log: " + " ".join(f"crate {i} moved to dock {i % 7} at hour {i % 24}." for i in range(14))


def _rows(tmp_path):  # type: ignore[no-untyped-def]
    """A short-question site and a long-document site (the shape of case 07), 24 rows each."""
    rows = [{"instruction": f"What is {i} plus 3?", "response": str(i + 3), "site": "north"} for i in range(24)]
    rows += [
        {"instruction": f"{LOG} Which dock got crate {i}?", "response": str(i % 7), "site": "south"} for i in range(24)
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path, tiny_model_dir, truncation):  # type: ignore[no-untyped-def]
    overrides = tiny_overrides(tmp_path, tiny_model_dir)
    overrides["data"] |= {"source": str(_rows(tmp_path)), "max_length": 64, "truncation": truncation}
    overrides["data"]["columns"] = {"label": "site"}
    overrides["data"]["partition"] |= {"scheme": "natural", "num_clients": 2, "min_partition_size": 2}
    return build_config(overrides)


def test_a_client_whose_examples_are_all_dropped_is_refused_by_name_before_anything_is_written(
    tmp_path, tiny_model_dir
) -> None:  # type: ignore[no-untyped-def]
    config = _config(tmp_path, tiny_model_dir, "drop")
    records = load_records(config.data)
    clients = split_records(records, config.data.partition).clients
    south = next(i for i, parts in enumerate(clients) if parts["train"][0]["label"] == "south")
    with pytest.raises(UnusableData) as refused:
        partition_records(config, records)
    message = str(refused.value)
    assert f"client {south}: 0 of {len(clients[south]['train'])} training rows left after tokenization" in message
    assert f"client {1 - south}:" not in message and "data.max_length=64 (data.truncation: drop)" in message
    assert not (tmp_path / "data" / "partitions").exists()


def test_the_default_keeps_every_response_whole_and_the_report_counts_each_outcome(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    config = _config(tmp_path, tiny_model_dir, "prompt")
    summary = partition_records(config, load_records(config.data))
    south = next(c for c in summary["clients"] if "south" in c["labels"])
    north = next(c for c in summary["clients"] if "north" in c["labels"])
    assert south["tokenized"]["train"] == {"kept": 0, "truncated": south["train"], "dropped": 0}
    assert north["tokenized"]["train"] == {"kept": north["train"], "truncated": 0, "dropped": 0}
    assert json.loads((tmp_path / "data" / "partitions" / "report.json").read_text()) == summary
    tokenizer = load_tokenizer(config.model)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for example in load_encoded(config, tokenizer, south["client"], "train"):
        assert len(example["input_ids"]) == 64 and example["labels"][-2] == end_of_turn  # answer, <|im_end|>, \n


def test_responses_cut_by_the_response_policy_are_counted_per_split(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    """rel-04: long responses were trained without their end and nobody was told."""
    config = _config(tmp_path, tiny_model_dir, "response")
    rows = [
        {"instruction": f"Describe crate {i}.", "response": LOG, "site": "north" if i % 2 else "south"}
        for i in range(40)
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = partition_records(config, load_records(config.data))
    for client in summary["clients"]:
        assert client["tokenized"]["train"] == {"kept": 0, "truncated": client["train"], "dropped": 0}
        assert client["tokenized"]["val"] == {"kept": 0, "truncated": client["val"], "dropped": 0}
    assert summary["test_tokenized"] == {"kept": 0, "truncated": summary["test_size"], "dropped": 0}


def test_an_empty_evaluation_set_has_no_value_instead_of_a_perfect_loss(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    """Case 07: a client's val split that kept nothing scored 0.0 and halved the mean val loss."""
    config = _config(tmp_path, tiny_model_dir, "drop")
    records = load_records(config.data)
    short = [r for r in records if r["label"] == "north"]
    long = [r for r in records if r["label"] == "south"]
    write_partitions(
        Partitions(
            clients=[{"train": short[:8], "val": long[:3]}, {"train": short[8:16], "val": short[16:20]}],
            test=short[20:],
        ),
        config.data.partitions_dir,
    )
    state, _ = initial_adapter_state(config)
    metrics = evaluate_adapter(config, state, generation=False)
    assert metrics["client_val_loss"][0] is None and metrics["client_val_loss"][1] > 0.5
    assert metrics["val_loss"] == metrics["client_val_loss"][1]
    assert loss_and_perplexity(torch.nn.Identity(), [], batch_size=4, pad_id=0) == {"loss": None, "perplexity": None}
