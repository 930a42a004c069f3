"""What tokenization keeps of each client's data, counted and checked before any training.

An example longer than `data.max_length` is cut or left out by `data.truncation`
(`fedtune.data.prompts.fit`); a silo whose every example is left out would otherwise drop out of
every round with a traceback while the run still reports itself as federated (trl#643, case 07),
and a count of what was cut is the only way a user learns that a long-response data set was
trained without its endings (rel-04). So partitioning tokenizes every split once, puts the counts
in the partition report, and refuses a client or a test set with nothing left.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from transformers import PreTrainedTokenizerBase

from fedtune.config.schema import FedConfig
from fedtune.core.catalog import OBJECTIVES
from fedtune.core.errors import InputError
from fedtune.data.loading import Record
from fedtune.data.partition import Partitions, read_split, split_records, write_partitions
from fedtune.data.prompts import DROPPED, KEPT, TRUNCATED, TemplateRefused
from fedtune.model.loading import load_tokenizer

Example = dict[str, list[int]]


class UnusableData(InputError):
    """A client or the test set has no example left after tokenization to `data.max_length`."""


def encode_counted(
    cfg: FedConfig, tokenizer: PreTrainedTokenizerBase, records: list[Record]
) -> tuple[list[Example], dict[str, int]]:
    """The records' examples under `train.objective`, and how many records were kept whole,
    truncated and dropped ({"kept": n, "truncated": n, "dropped": n})."""
    objective = OBJECTIVES.get(cfg.train.objective)
    examples: list[Example] = []
    outcomes = Counter({KEPT: 0, TRUNCATED: 0, DROPPED: 0})
    for record in records:
        try:
            encoded, outcome = objective.encode(tokenizer, record, cfg.data)
        except TemplateRefused as error:  # name the record, so it can be found in a large file
            start = str(record["messages"][0]["content"])[:60] if record.get("messages") else ""
            raise TemplateRefused(f"{error} (the record that begins {start!r})") from None
        examples += encoded
        outcomes[outcome] += 1
    return examples, dict(outcomes)


def encode_records(cfg: FedConfig, tokenizer: PreTrainedTokenizerBase, records: list[Record]) -> list[Example]:
    return encode_counted(cfg, tokenizer, records)[0]


def load_encoded(cfg: FedConfig, tokenizer: PreTrainedTokenizerBase, client: int | None, split: str) -> list[Example]:
    """One client's split (or the test set when `client` is None), encoded."""
    return encode_records(cfg, tokenizer, read_split(cfg.data.partitions_dir, client, split))


def count_tokenized(cfg: FedConfig, tokenizer: PreTrainedTokenizerBase, partitions: Partitions) -> dict[str, Any]:
    """{"clients": [{"train": counts, "val": counts}, ...], "test": counts} (counts of `encode_counted`)."""
    return {
        "clients": [
            {split: encode_counted(cfg, tokenizer, rows)[1] for split, rows in parts.items()}
            for parts in partitions.clients
        ],
        "test": encode_counted(cfg, tokenizer, partitions.test)[1],
    }


def _usable(counts: dict[str, int]) -> int:
    return counts[KEPT] + counts[TRUNCATED]


def refuse_unusable(cfg: FedConfig, tokenized: dict[str, Any]) -> None:
    """Raises UnusableData naming every client with no training example left, and an unusable test set."""
    cut = f"after tokenization to data.max_length={cfg.data.max_length} (data.truncation: {cfg.data.truncation})"
    problems = [
        f"client {c}: 0 of {sum(splits['train'].values())} training rows left {cut}, {splits['train'][DROPPED]} dropped"
        for c, splits in enumerate(tokenized["clients"])
        if _usable(splits["train"]) == 0
    ]
    if _usable(tokenized["test"]) == 0:
        problems.append(f"the global test set: 0 of {sum(tokenized['test'].values())} rows left {cut}")
    if problems:
        raise UnusableData(
            "data.max_length: " + "; ".join(problems) + ". Raise data.max_length, set data.truncation to 'prompt' "
            "(the response is kept whole), or shorten the prompts."
        )


def partition_records(cfg: FedConfig, records: list[Record]) -> dict[str, Any]:
    """Split `records` (a global test set, then per-client train/val), count what tokenization
    keeps of every split, refuse unusable clients before anything is written, then write the
    partitions and their report to `data.partitions_dir`; returns the report."""
    partitions = split_records(records, cfg.data.partition)
    tokenized = count_tokenized(cfg, load_tokenizer(cfg.model), partitions)
    refuse_unusable(cfg, tokenized)
    return write_partitions(partitions, cfg.data.partitions_dir, tokenized)
