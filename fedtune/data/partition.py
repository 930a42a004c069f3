"""Split records into a global test set and N clients, each with train/val; deterministic by seed.

The per-client split itself is delegated to flwr-datasets' partitioners (IID, Dirichlet over a
label column, natural split by a column value, size-based for quantity skew); this module only
adds the global test hold-out, per-client validation splits, the checks and the report.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedtune.core.atomic import staged_directory
from fedtune.core.catalog import PARTITIONERS
from fedtune.core.errors import InputError
from fedtune.data.loading import Record, read_jsonl, write_jsonl

# flwr_datasets (with its plotting stack) and datasets load only when partitioning: every client and
# coordinator process imports this module for its paths, and they cost it about 1.5 s to start
if TYPE_CHECKING:
    import datasets
    from flwr_datasets import partitioner as flwr


class PartitionError(InputError):
    pass


@dataclass(frozen=True)
class PartitionScheme:
    build: Callable[[Any, datasets.Dataset], flwr.Partitioner]
    needs_column: bool


def _iid(section: Any, _: datasets.Dataset) -> flwr.Partitioner:
    from flwr_datasets import partitioner as flwr

    return flwr.IidPartitioner(num_partitions=section.num_clients)


def _dirichlet(section: Any, _: datasets.Dataset) -> flwr.Partitioner:
    from flwr_datasets import partitioner as flwr

    return flwr.DirichletPartitioner(
        num_partitions=section.num_clients,
        partition_by="label",
        alpha=section.alpha,
        min_partition_size=section.min_partition_size,
        seed=section.seed,
    )


def _natural(section: Any, dataset: datasets.Dataset) -> flwr.Partitioner:
    from flwr_datasets import partitioner as flwr

    values = sorted(set(dataset["label"]))
    if len(values) != section.num_clients:
        raise PartitionError(
            f"data.partition.num_clients: natural split by column gives {len(values)} clients "
            f"({values[:10]}), not {section.num_clients}"
        )
    return flwr.NaturalIdPartitioner(partition_by="label")


def _quantity_skew(section: Any, dataset: datasets.Dataset) -> flwr.Partitioner:
    """Client sizes drawn from Dirichlet(alpha) (small alpha = very unequal), each >= the minimum."""
    from flwr_datasets import partitioner as flwr

    n, floor = section.num_clients, section.min_partition_size
    spare = len(dataset) - n * floor
    if spare < 0:
        raise PartitionError(f"data.partition.min_partition_size: {n} clients x {floor} > {len(dataset)} rows")
    shares = np.random.default_rng(section.seed).dirichlet([section.alpha] * n)
    sizes = [floor + int(s) for s in np.floor(shares * spare)]
    sizes[int(np.argmax(shares))] += len(dataset) - sum(sizes)
    return flwr.SizePartitioner(partition_sizes=sizes)


IID = PartitionScheme(_iid, needs_column=False)
DIRICHLET = PartitionScheme(_dirichlet, needs_column=True)
NATURAL = PartitionScheme(_natural, needs_column=True)
QUANTITY_SKEW = PartitionScheme(_quantity_skew, needs_column=False)


@dataclass
class Partitions:
    clients: list[dict[str, list[Record]]]  # [{"train": [...], "val": [...]}, ...]
    test: list[Record]


def split_records(records: list[Record], section: Any) -> Partitions:
    """Hold out a global test set, partition the rest over clients, split each into train/val."""
    rng = random.Random(section.seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    n_test = max(1, round(len(records) * section.test_fraction))
    test = [records[i] for i in order[:n_test]]
    pool = [records[i] for i in order[n_test:]]
    if len(pool) < 2 * section.num_clients:
        raise PartitionError(
            f"data.partition.num_clients: {section.num_clients} clients need at least 2 rows each, "
            f"but only {len(pool)} rows remain after the test hold-out"
        )
    import datasets

    scheme = PARTITIONERS.get(section.scheme)
    dataset = datasets.Dataset.from_dict({"idx": list(range(len(pool))), "label": [r["label"] for r in pool]})
    partitioner = scheme.build(section, dataset)
    partitioner.dataset = dataset
    try:
        client_indices = [list(partitioner.load_partition(i)["idx"]) for i in range(section.num_clients)]
    except ValueError as error:
        raise PartitionError(f"data.partition: {error}") from None
    empty = [i for i, idx in enumerate(client_indices) if len(idx) < 2]
    if empty:
        raise PartitionError(
            f"data.partition: clients {empty} get fewer than 2 rows (need train and val); "
            "use fewer clients, a larger alpha or more data"
        )
    clients = []
    for idx in client_indices:
        rows = [pool[i] for i in idx]
        rng.shuffle(rows)
        n_val = min(len(rows) - 1, max(1, round(len(rows) * section.val_fraction)))
        clients.append({"train": rows[n_val:], "val": rows[:n_val]})
    return Partitions(clients=clients, test=test)


def report(partitions: Partitions, tokenized: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sizes and label histogram per client, for the partition report and MLflow; with `tokenized`
    (`fedtune.training.tokenized.count_tokenized`) also what tokenization kept, truncated and dropped."""
    summary: dict[str, Any] = {
        "num_clients": len(partitions.clients),
        "test_size": len(partitions.test),
        "clients": [
            {
                "client": i,
                "train": len(parts["train"]),
                "val": len(parts["val"]),
                "labels": dict(sorted(Counter(str(r["label"]) for r in parts["train"]).items())),
            }
            for i, parts in enumerate(partitions.clients)
        ],
    }
    if tokenized is not None:
        for client, counts in zip(summary["clients"], tokenized["clients"], strict=True):
            client["tokenized"] = counts
        summary["test_tokenized"] = tokenized["test"]
    return summary


def client_dir(root: str | Path, client: int) -> Path:
    return Path(root) / f"client_{client}"


def write_partitions(
    partitions: Partitions, root: str | Path, tokenized: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write all partitions and the report; `root` is replaced in one step."""
    summary = report(partitions, tokenized)
    with staged_directory(root) as staging:
        for i, parts in enumerate(partitions.clients):
            for split, rows in parts.items():
                write_jsonl(rows, client_dir(staging, i) / f"{split}.jsonl")
        write_jsonl(partitions.test, staging / "test.jsonl")
        (staging / "report.json").write_text(json.dumps(summary, indent=2))
    return summary


def split_path(root: str | Path, client: int | None, split: str) -> Path:
    """Where one client's split lives, or the global test set when `client` is None."""
    return Path(root) / "test.jsonl" if client is None else client_dir(root, client) / f"{split}.jsonl"


def read_split(root: str | Path, client: int | None, split: str) -> list[Record]:
    """One client's split, or the global test set when `client` is None."""
    path = split_path(root, client, split)
    if not path.exists():
        raise PartitionError(f"data.partitions_dir: {path} is missing; run the partition step first")
    return read_jsonl(path)
