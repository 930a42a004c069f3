import math
from collections import Counter

import pytest

from fedtune.config.schema import build_config
from fedtune.data.loading import load_records
from fedtune.data.partition import PartitionError, read_split, report, split_records, write_partitions


def _records(per_skill: int = 60) -> list[dict]:
    config = build_config(
        {"data": {"synthetic": {"examples_per_skill": per_skill, "skills": ["add", "parity", "sort", "successor"]}}}
    )
    return load_records(config.data)


def _section(**kw):  # type: ignore[no-untyped-def]
    return build_config({"data": {"partition": kw}}).data.partition


def _entropy(labels: dict[str, int]) -> float:
    total = sum(labels.values())
    return -sum(c / total * math.log(c / total) for c in labels.values() if c)


def test_iid_sizes_cover_everything_once_and_are_deterministic() -> None:
    records = _records()
    parts = split_records(records, _section(scheme="iid", num_clients=4))
    rows = parts.test + [r for c in parts.clients for split in c.values() for r in split]
    assert len(rows) == len(records)
    assert Counter(map(str, rows)) == Counter(map(str, records))
    sizes = [len(c["train"]) + len(c["val"]) for c in parts.clients]
    assert max(sizes) - min(sizes) <= 1
    again = split_records(records, _section(scheme="iid", num_clients=4))
    assert again.clients == parts.clients and again.test == parts.test
    other_seed = split_records(records, _section(scheme="iid", num_clients=4, seed=7))
    assert other_seed.test != parts.test


def test_dirichlet_small_alpha_is_more_label_skewed_than_large() -> None:
    records = _records(100)

    def mean_entropy(alpha: float) -> float:
        parts = split_records(records, _section(scheme="dirichlet", num_clients=4, alpha=alpha, min_partition_size=5))
        return sum(_entropy(c["labels"]) for c in report(parts)["clients"]) / 4

    assert mean_entropy(0.1) < mean_entropy(100.0) - 0.3
    assert mean_entropy(100.0) > 0.9 * math.log(4)


def test_natural_split_gives_one_label_per_client() -> None:
    parts = split_records(_records(), _section(scheme="natural", num_clients=4))
    assert sorted(len(c["labels"]) for c in report(parts)["clients"]) == [1, 1, 1, 1]
    with pytest.raises(PartitionError, match="natural split by column gives 4 clients"):
        split_records(_records(), _section(scheme="natural", num_clients=3))


def test_quantity_skew_gives_unequal_sizes_above_minimum() -> None:
    parts = split_records(_records(), _section(scheme="quantity_skew", num_clients=4, alpha=0.3, min_partition_size=10))
    sizes = [len(c["train"]) + len(c["val"]) for c in parts.clients]
    assert min(sizes) >= 10 and max(sizes) > 2 * min(sizes)


def test_too_many_clients_is_a_clear_error() -> None:
    with pytest.raises(PartitionError, match="data.partition"):
        split_records(_records(3), _section(scheme="iid", num_clients=12))


def test_written_partitions_read_back_with_report(tmp_path) -> None:  # type: ignore[no-untyped-def]
    parts = split_records(_records(), _section(scheme="iid", num_clients=3))
    summary = write_partitions(parts, tmp_path / "parts")
    assert summary["clients"][1]["train"] == len(read_split(tmp_path / "parts", 1, "train"))
    assert read_split(tmp_path / "parts", None, "test") == parts.test
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(PartitionError, match="run the partition step"):
        read_split(tmp_path / "nothing", 0, "train")
