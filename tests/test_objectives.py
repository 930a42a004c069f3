"""Training objectives: DPO against trl's DPOTrainer, federated DPO and continued pre-training runs."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedtune.config.schema import ConfigError, build_config
from fedtune.core.catalog import OBJECTIVES
from fedtune.data.loading import DataError, load_records
from fedtune.data.prompts import IGNORE_INDEX
from fedtune.model.adapters import get_adapter_state, set_adapter_state
from fedtune.model.builder import build_peft_model, tokenizer_for
from fedtune.training.evaluation import preference_metrics
from fedtune.training.tokenized import encode_records
from tests.conftest import tiny_overrides

PAIRS = {"data": {"columns": {"rejected": "rejected"}}, "train": {"objective": "dpo"}}


def _config(tmp_path, tiny_model_dir, *changes):  # type: ignore[no-untyped-def]
    data = tiny_overrides(tmp_path, tiny_model_dir)
    for change in changes:
        for section, values in change.items():
            for key, value in values.items():
                if isinstance(value, dict):
                    data.setdefault(section, {}).setdefault(key, {}).update(value)
                else:
                    data.setdefault(section, {})[key] = value
    return build_config(data)


def _perturbed_model(config):  # type: ignore[no-untyped-def]
    """The PEFT model with random LoRA weights, so the policy differs from its reference (the base)."""
    model = build_peft_model(config)
    generator = torch.Generator().manual_seed(3)
    state = {k: 0.3 * torch.randn(v.shape, generator=generator) for k, v in get_adapter_state(model).items()}
    set_adapter_state(model, state)
    return model


def test_dpo_loss_equals_trls_dpo_trainer_on_the_same_pairs(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    config = _config(tmp_path, tiny_model_dir, PAIRS)
    tokenizer = tokenizer_for(config)
    pairs = encode_records(config, tokenizer, load_records(config.data)[:6])
    model = _perturbed_model(config)
    beta = 0.3

    train = config.train.model_copy(update={"dpo_beta": beta})
    ours = OBJECTIVES.get("dpo").loss(model, pairs, tokenizer.pad_token_id, train)[0]

    def split(ids, labels):  # type: ignore[no-untyped-def]
        start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        return ids[:start], ids[start:]

    rows = []
    for pair in pairs:
        prompt, chosen = split(pair["input_ids"], pair["labels"])
        prompt_again, rejected = split(pair["rejected_input_ids"], pair["rejected_labels"])
        assert prompt == prompt_again  # both responses follow the same prompt tokens
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, report_to="none", use_cpu=True, bf16=False)
    trainer = DPOTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
    )
    # trl keeps a copy of an adapter it is handed as the reference; for a new adapter (ours: the round-0
    # adapter is the identity) it disables the adapter, which is what fedtune does, so compare with that
    trainer.model.delete_adapter("ref")
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(rows)
    theirs = trainer.compute_loss(trainer.model, batch)

    assert abs(ours.item() - theirs.item()) < 1e-5
    assert abs(ours.item() - 0.6931) > 0.01  # not log 2, the value when policy == reference


def test_the_reference_is_the_base_model_so_a_fresh_adapter_starts_at_log_two(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    config = _config(tmp_path, tiny_model_dir, PAIRS)
    tokenizer = tokenizer_for(config)
    pairs = encode_records(config, tokenizer, load_records(config.data)[:8])
    fresh = preference_metrics(build_peft_model(config), pairs, beta=0.1, batch_size=4, pad_id=tokenizer.pad_token_id)
    assert fresh["dpo_loss"] == pytest.approx(0.693147, abs=1e-5)
    assert fresh["reward_margin"] == pytest.approx(0.0, abs=1e-6)


def test_federated_dpo_learns_to_prefer_the_chosen_answers(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from flows.federated_finetune import federated_finetune

    config = _config(
        tmp_path,
        tiny_model_dir,
        PAIRS,
        # near misses of casing and order generalize in a 2-layer model; off-by-one numbers do not
        {"data": {"synthetic": {"examples_per_skill": 60, "skills": ["uppercase", "sort"]}}},
        {"train": {"lr": 0.01, "steps_per_round": 8}, "federation": {"rounds": 2}},
    )
    summary = federated_finetune(config=config)
    assert summary["rounds"] == 2
    rounds = _round_metrics(tmp_path)
    assert rounds[0]["test_dpo_loss"] == pytest.approx(0.693147, abs=1e-4)
    assert rounds[-1]["test_dpo_loss"] < rounds[0]["test_dpo_loss"] - 0.05
    assert rounds[-1]["test_reward_accuracy"] > 0.7


def _round_metrics(root):  # type: ignore[no-untyped-def]
    import csv

    with (root / "outputs" / "federated" / "rounds.csv").open() as handle:
        return [{k: float(v) for k, v in row.items() if v and k.startswith("test_")} for row in csv.DictReader(handle)]


def _write_corpus(path, documents: int = 60) -> None:  # type: ignore[no-untyped-def]
    """Raw text with a learnable regularity: each document lists numbers counting up by a step."""
    with path.open("w") as handle:
        for doc in range(documents):
            step = 1 + doc % 3
            numbers = " ".join(str(10 + step * i) for i in range(12 + doc % 5))
            handle.write(json.dumps({"body": f"Counting by {step}: {numbers}.", "source": f"s{doc % 3}"}) + "\n")


def test_pretraining_chunks_documents_and_puts_the_loss_on_every_token(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    corpus = tmp_path / "corpus.jsonl"
    _write_corpus(corpus, 6)
    config = _config(
        tmp_path,
        tiny_model_dir,
        {
            "data": {"source": str(corpus), "max_length": 16, "columns": {"text": "body", "label": "source"}},
            "train": {"objective": "pretrain"},
        },
    )
    tokenizer = tokenizer_for(config)
    records = load_records(config.data)
    assert records[0] == {"text": json.loads(corpus.read_text().splitlines()[0])["body"], "label": "s0"}
    examples, outcome = OBJECTIVES.get("pretrain").encode(tokenizer, records[0], config.data)
    assert outcome == "kept"  # a document is chunked, never cut
    ids = tokenizer(records[0]["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [t for e in examples for t in e["input_ids"]] == ids  # the document, in order, nothing else
    assert all(len(e["input_ids"]) <= 16 and e["labels"] == e["input_ids"] for e in examples)
    assert len(examples) == -(-len(ids) // 16)


def test_federated_continued_pretraining_lowers_the_loss_on_held_out_text(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from flows.federated_finetune import federated_finetune

    corpus = tmp_path / "corpus.jsonl"
    _write_corpus(corpus)
    config = _config(
        tmp_path,
        tiny_model_dir,
        {
            "data": {"source": str(corpus), "max_length": 32, "columns": {"text": "body", "label": "source"}},
            "train": {"objective": "pretrain", "steps_per_round": 8},
            "federation": {"rounds": 2},
        },
    )
    summary = federated_finetune(config=config)
    rounds = _round_metrics(tmp_path)
    assert rounds[-1]["test_loss"] < rounds[0]["test_loss"] - 0.1
    assert summary["test_accuracy"] is None  # raw text has no answers to score
    adapter = tmp_path / "outputs" / "federated" / "final_adapter.safetensors"
    assert load_file(str(adapter))  # the federated adapter itself, as any objective's
    assert isinstance(build_peft_model(config, str(adapter)), PeftModel)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train": {"objective": "dpo"}}, "data.columns.rejected"),
        ({"train": {"objective": "pretrain"}}, "data.columns.text"),
        ({**PAIRS, "record_dp": {"enabled": True}}, "DP-SGD on preference pairs"),
        ({"data": {"columns": {"text": "body"}}}, "data.columns.text: raw text is for train.objective=pretrain"),
        ({"train": {"objective": "rlhf"}}, "unknown training objective 'rlhf'"),
        ({"data": {"columns": {"text": "body", "rejected": "worse"}}}, "different layouts"),
    ],
)
def test_objectives_refuse_configs_they_cannot_train(tmp_path, tiny_model_dir, changes, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, tiny_model_dir, changes)


def test_a_missing_rejected_column_is_named_before_any_work(tmp_path, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"instruction": "q", "response": "a", "worse": "b"}) + "\n")
    config = _config(
        tmp_path,
        tiny_model_dir,
        {
            "data": {"source": str(source), "columns": {"rejected": "rejected", "label": None}},
            "train": {"objective": "dpo"},
        },
        {"data": {"partition": {"scheme": "iid"}}},
    )
    with pytest.raises(DataError, match="data.columns.rejected: column 'rejected' not in the data set"):
        load_records(config.data)
