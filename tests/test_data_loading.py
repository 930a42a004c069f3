import json

import datasets
import pandas as pd
import pytest

from fedtune.config import build_config
from fedtune.data.loading import DataError, load_records

ROWS = [
    {"question": f"q{i}", "context": "ctx" if i % 2 else "", "answer": f"a{i}", "topic": "x" if i < 3 else "y"}
    for i in range(6)
]
MAPPING = {"instruction": "question", "input": "context", "response": "answer", "label": "topic"}


def _data(source, **extra):  # type: ignore[no-untyped-def]
    return build_config({"data": {"source": str(source), "columns": MAPPING, **extra}}).data


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_files_load_through_the_column_mapping(tmp_path, suffix) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / f"rows.{suffix}"
    frame = pd.DataFrame(ROWS)
    {
        "jsonl": lambda: frame.to_json(path, orient="records", lines=True),
        "csv": lambda: frame.to_csv(path, index=False),
        "parquet": lambda: frame.to_parquet(path),
    }[suffix]()
    records = load_records(_data(path))
    assert len(records) == 6
    assert records[1]["messages"] == [
        {"role": "user", "content": "q1\n\nctx"},
        {"role": "assistant", "content": "a1"},
    ]
    assert records[0]["messages"][0]["content"] == "q0" and records[0]["label"] == "x"


def test_saved_datasets_directory_and_messages_column(tmp_path) -> None:  # type: ignore[no-untyped-def]
    chats = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]] * 4
    datasets.Dataset.from_dict({"chat": chats, "topic": ["a", "b", "a", "b"]}).save_to_disk(tmp_path / "ds")
    records = load_records(_data(tmp_path / "ds", columns={"messages": "chat", "label": "topic"}))
    assert records[0]["messages"][-1] == {"role": "assistant", "content": "hello"}


def test_missing_columns_named_in_one_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "p", "completion": "c"}) for _ in range(3)))
    with pytest.raises(DataError) as info:
        load_records(_data(path))
    text = str(info.value)
    assert "data.columns.instruction: column 'question'" in text
    assert "data.columns.response: column 'answer'" in text
    assert "data.columns.label: column 'topic'" in text


def test_missing_file_is_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match="data.source: file .*nope.jsonl does not exist"):
        load_records(_data(tmp_path / "nope.jsonl"))
