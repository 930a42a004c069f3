"""Fixtures: a tiny tokenizer and 2-layer Llama built locally, and a tiny config around them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """A model family's tokenizer conventions: its special tokens and chat template."""

    special: tuple[str, ...]
    bos: str
    eos: str
    pad: str | None
    template: str | None


QWEN = Family(("<unk>", "<|im_start|>", "<|im_end|>"), "<|im_start|>", "<|im_end|>", "<|im_end|>", CHATML)


def build_tokenizer(directory: Path, with_template: bool = True, vocab_size: int = 600, family: Family = QWEN) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fedtune.core.catalog import SKILLS
    from fedtune.data.synthetic import generate

    rows = generate(SKILLS.names(), 30, seed=1)
    texts = [f"system user assistant Answer with the result only. {r['instruction']} {r['response']}" for r in rows]
    texts += [" ".join(str(i) for i in range(10000))]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(family.special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token="<unk>",
        additional_special_tokens=[t for t in family.special if t not in ("<unk>", family.bos, family.eos)],
    )
    if with_template and family.template is not None:
        tokenizer.chat_template = family.template
    tokenizer.save_pretrained(directory)
    return directory


def build_model(directory: Path, vocab_size: int, layers: int = 2, hidden: int = 64, pretrain_steps: int = 80) -> Path:
    """A 2-layer Llama, briefly pretrained on chat-formatted text so it behaves like a small
    pretrained LM (a random one barely responds to LoRA), then saved with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedtune.data.prompts import collate, encode
    from fedtune.data.synthetic import generate

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    rows = generate(["compare", "sort", "last_letter", "uppercase"], 60, seed=2)
    records = [
        {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["response"]}]}
        for r in rows
    ]
    data = [e for e, _ in (encode(tokenizer, r, None, 64, "response") for r in records) if e is not None]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(pretrain_steps):
        batch = collate([data[(step * 16 + i) % len(data)] for i in range(16)], tokenizer.pad_token_id)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tiny-model")
    build_tokenizer(directory)
    build_model(directory, len(AutoTokenizer.from_pretrained(directory)))
    return directory


def tiny_overrides(root: Path, model_dir: Path) -> dict:
    """A config small enough for CPU tests; everything it writes goes under `root`."""
    return {
        "model": {"name_or_path": str(model_dir), "source": None, "dtype": "float32"},
        "peft": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {
            "max_length": 48,
            "synthetic": {"examples_per_skill": 40, "skills": ["add", "parity", "successor"]},
            "partition": {"num_clients": 3, "alpha": 0.5, "min_partition_size": 5, "test_fraction": 0.15},
            "processed_path": str(root / "data" / "processed.jsonl"),
            "partitions_dir": str(root / "data" / "partitions"),
        },
        "federation": {"rounds": 3, "clients_per_round": 2, "output_dir": str(root / "outputs" / "federated")},
        "train": {"lr": 0.01, "batch_size": 4, "steps_per_round": 6},
        "eval": {"batch_size": 16, "generation_samples": 8, "max_new_tokens": 4},
        "tracking": {
            "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "artifact_location": str(root / "mlartifacts"),
            "experiment": "tests",
        },
    }


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from fedtune.config.schema import build_config

    return build_config(tiny_overrides(tmp_path, tiny_model_dir))
