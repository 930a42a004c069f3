"""Load a data source into normalized chat records, through the configured column mapping.

Every record becomes `{"messages": [...], "label": ...}` whose last message is the assistant
response to learn; the rest is the prompt. Preference data adds `"rejected"` (the dispreferred
response, for DPO); raw text for continued pre-training is `{"text": ..., "label": ...}` instead.
Unknown or missing columns fail before any work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import datasets

from fedtune.config import DataSection
from fedtune.data.synthetic import generate
from fedtune.errors import InputError

Record = dict[str, Any]
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(InputError):
    pass


def _load_dataset(section: DataSection) -> datasets.Dataset:
    path = Path(section.source).expanduser()
    if path.suffix in FILE_BUILDERS:
        if not path.exists():
            raise DataError(f"data.source: file {path} does not exist")
        return datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if section.split not in loaded:
                raise DataError(f"data.split: {section.split!r} not in {list(loaded)}")
            return loaded[section.split]
        return loaded
    try:
        return datasets.load_dataset(section.source, split=section.split)
    except Exception as error:  # datasets raises many types for "not found / offline"
        raise DataError(f"data.source: cannot load {section.source!r} ({type(error).__name__}: {error})") from None


def check_columns(section: DataSection, available: list[str]) -> None:
    """All mapped columns must exist (`input` is optional); one error lists every missing one."""
    from fedtune.catalog import PARTITIONERS

    cols = section.columns
    required: dict[str, str | None]
    if cols.text:
        required = {"columns.text": cols.text}
    elif cols.messages:
        required = {"columns.messages": cols.messages}
    else:
        required = {"columns.instruction": cols.instruction, "columns.response": cols.response}
    if cols.rejected:
        required["columns.rejected"] = cols.rejected
    if PARTITIONERS.get(section.partition.scheme).needs_column:
        field = "partition.column" if section.partition.column else "columns.label"
        required[field] = section.partition.column or cols.label
    missing = [
        f"data.{field}: column {name!r} not in the data set (it has {available})"
        for field, name in required.items()
        if name not in available
    ]
    if missing:
        raise DataError("; ".join(missing))


def _to_record(row: dict[str, Any], section: DataSection, label_column: str | None) -> Record:
    cols = section.columns
    label = row.get(label_column) if label_column else None
    label = None if label is None else str(label)
    if cols.text:
        return {"text": str(row[cols.text]), "label": label}
    if cols.messages:
        messages = [{"role": m["role"], "content": str(m["content"])} for m in row[cols.messages]]
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError(f"data.columns.messages: a conversation does not end with an assistant turn: {messages}")
    else:
        # the config guarantees instruction and response are set when messages is not
        user = str(row[cast(str, cols.instruction)])
        extra = row.get(cols.input) if cols.input else None
        if extra not in (None, ""):
            user = f"{user}\n\n{extra}"
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": str(row[cast(str, cols.response)])},
        ]
    record: Record = {"messages": messages, "label": label}
    if cols.rejected:
        record["rejected"] = str(row[cols.rejected])
    return record


def load_records(section: DataSection) -> list[Record]:
    """Normalized records of the configured source (the synthetic demo set by default)."""
    if section.source == "synthetic":
        syn = section.synthetic
        rows = generate(syn.skills, syn.examples_per_skill, syn.seed)
        available = list(rows[0]) if rows else []
    else:
        dataset = _load_dataset(section)
        available = list(dataset.column_names)
        rows = dataset.to_list()
    check_columns(section, available)
    if section.max_examples is not None:
        rows = rows[: section.max_examples]
    if not rows:
        raise DataError(f"data.source: {section.source!r} has no rows")
    label_column = section.partition.column or section.columns.label
    label_column = label_column if label_column in available else None
    return [_to_record(row, section, label_column) for row in rows]


def write_jsonl(records: list[Record], path: str | Path) -> Path:
    """Write atomically: a crash leaves no file that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def read_jsonl(path: str | Path) -> list[Record]:
    if not Path(path).exists():
        raise DataError(f"{path} does not exist; run the step that writes it first (prepare-data)")
    with Path(path).open() as handle:
        return [json.loads(line) for line in handle if line.strip()]
