"""Data preparation and partitioning steps."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fedtune.config.schema import FedConfig
from fedtune.data.loading import load_records, read_jsonl, write_jsonl
from fedtune.training.tokenized import partition_records


@task(cache_policy=NO_CACHE)
def prepare_data(config: FedConfig) -> str:
    """Load the source through the column mapping and write normalized chat records."""
    records = load_records(config.data)
    path = write_jsonl(records, config.data.processed_path)
    get_run_logger().info("prepared %d records from %s -> %s", len(records), config.data.source, path)
    return str(path)


@task(cache_policy=NO_CACHE)
def partition(config: FedConfig, processed_path: str) -> dict[str, Any]:
    """Global test hold-out plus per-client train/val splits; returns the partition report
    (with what tokenization kept, truncated and dropped of each split)."""
    summary = partition_records(config, read_jsonl(processed_path))
    logger = get_run_logger()
    for client in summary["clients"]:
        logger.info(
            "client %d: %d train / %d val, labels %s; tokenized train %s",
            client["client"],
            client["train"],
            client["val"],
            client["labels"],
            client["tokenized"]["train"],
        )
    logger.info("test set: %d rows; tokenized %s", summary["test_size"], summary["test_tokenized"])
    return summary
