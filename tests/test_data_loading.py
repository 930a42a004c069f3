import json

import datasets
import pandas as pd
import pytest

from fedtune.config.schema import build_config
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


def test_csv_cells_stay_text_exactly_as_written(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Case 03: pandas' inference would give 49.0, 7, 0.5, 12.0 and drop the NA input."""
    path = tmp_path / "rows.csv"
    path.write_text(
        "question,context,answer,topic\n"
        "prefix for,DE,+49,phone\n"
        "prefix for,NA,+264,phone\n"
        "agent code,,007,codes\n"
        "price,null,0.50,money\n"
        "count,None,12,money\n"
        "flag,true,false,codes\n"
    )
    records = load_records(_data(path))
    assert [r["messages"][-1]["content"] for r in records] == ["+49", "+264", "007", "0.50", "12", "false"]
    assert [r["messages"][0]["content"] for r in records] == [
        "prefix for\n\nDE",
        "prefix for\n\nNA",
        "agent code",
        "price\n\nnull",
        "count\n\nNone",
        "flag\n\ntrue",
    ]


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"question": "q", "answer": None, "topic": "x"}, "data.columns.response"),
        ({"question": "q", "answer": "", "topic": "x"}, "data.columns.response"),
        ({"question": None, "answer": "a", "topic": "x"}, "data.columns.instruction"),
        ({"question": "q", "answer": "a", "topic": None}, "data.columns.label"),
    ],
)
def test_a_null_value_is_a_named_error_or_a_counted_drop(tmp_path, row, field, caplog) -> None:  # type: ignore[no-untyped-def]
    """rel-03 and case 09: never the text "None" as a training target, never a crashing partitioner."""
    path = tmp_path / "rows.jsonl"
    good = [{"question": f"q{i}", "answer": f"a{i}", "topic": "x"} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in [*good[:2], row, *good[2:]]))
    with pytest.raises(
        DataError, match=rf"{field}: 1 of 5 rows of .*rows.jsonl have no .* value .*e.g. row 3 \(line 3\)"
    ):
        load_records(_data(path))
    records = load_records(_data(path, drop_incomplete=True))
    assert len(records) == 4 and all(r["messages"][-1]["content"] != "None" for r in records)
    assert "dropped 1 of 5 rows" in caplog.text


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", "is empty"),
        ("empty.csv", b"\n", "is empty"),
        ("header_only.csv", b"question,answer,topic\n", "has a header but no rows"),
        (
            "latin1.csv",
            "question,answer,topic\ncaf\u00e9,a,x\n".encode("latin-1"),
            r"is not utf-8 \(byte 0xe9 at offset 25\)",
        ),
        ("utf16.csv", "question,answer,topic\nq,a,x\n".encode("utf-16"), r"is not utf-8 .*set data.encoding"),
        (
            "broken.jsonl",
            b'{"question": "q", "answer": "a", "topic": "x"}\n{"question": "q", "ans\n',
            "line 2 is not valid JSON",
        ),
    ],
)
def test_unreadable_files_are_one_named_error(tmp_path, name, content, message) -> None:  # type: ignore[no-untyped-def]
    """rel-02: each unreadable file is one DataError naming it, not a library traceback."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"data.source: .*{name} {message}"):
        load_records(_data(path, columns={"instruction": "question", "response": "answer", "label": "topic"}))


def test_data_encoding_reads_other_encodings(tmp_path) -> None:  # type: ignore[no-untyped-def]
    columns = {"instruction": "question", "response": "answer", "label": "topic"}
    for encoding in ("latin-1", "utf-16"):
        path = tmp_path / f"{encoding}.csv"
        path.write_bytes("question,answer,topic\ncaf\u00e9,cr\u00e8me,x\n".encode(encoding))
        (record,) = load_records(_data(path, columns=columns, encoding=encoding))
        assert record["messages"] == [
            {"role": "user", "content": "caf\u00e9"},
            {"role": "assistant", "content": "cr\u00e8me"},
        ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("q,a,t\nWhat is 1000?,1,000,num\n", r"line 2 has 4 cells, the header 3"),
        ("q,a,a,t\nx,y,z,w\n", r"line 1 names columns more than once: \['a'\]"),
        (
            'q,a,t\nq1,a1,x\nq2,"5,x\nq3,a3,x\n',
            r"the record starting at line 3 cannot be read as CSV",
        ),  # no silent merge
    ],
)
def test_csv_rows_that_do_not_fit_the_header_are_named(tmp_path, content, message) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "rows.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_records(_data(path, columns={"instruction": "q", "response": "a", "label": "t", "input": None}))


@pytest.mark.parametrize(
    "turns",
    [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
        [{"role": "user", "content": "hi"}, {"content": "hello"}],
        "not a list",
    ],
)
def test_a_malformed_conversation_is_a_named_error(tmp_path, turns) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"chat": turns, "topic": "a"}) + "\n")
    with pytest.raises(DataError, match="data.columns.messages"):
        load_records(_data(path, columns={"messages": "chat", "label": "topic"}))


def test_jsonl_strings_may_hold_any_unicode_line_separator(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "rows.jsonl"
    path.write_text(
        json.dumps({"question": "a\u2028b\x0cc", "answer": "d\x85e", "topic": "x"}, ensure_ascii=False) + "\r\n"
    )
    (record,) = load_records(_data(path, columns={"instruction": "question", "response": "answer", "label": "topic"}))
    assert record["messages"][0]["content"] == "a\u2028b\x0cc" and record["messages"][1]["content"] == "d\x85e"


def test_json_values_stay_as_written_and_nan_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Review finding: JSON numbers and booleans became Python's text (0.50 -> 0.5, true -> True)."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"q": "a", "a": 0.50, "t": false}\n{"q": "b", "a": true, "t": 1e3}\n')
    records = load_records(_data(path, columns={"instruction": "q", "response": "a", "label": "t"}))
    assert [(r["messages"][-1]["content"], r["label"]) for r in records] == [("0.50", "false"), ("true", "1e3")]
    path.write_text('{"q": "a", "a": NaN, "t": "x"}\n')
    with pytest.raises(DataError, match="line 1 is not valid JSON \\(NaN is not a JSON value"):
        load_records(_data(path, columns={"instruction": "q", "response": "a", "label": "t"}))


def test_a_folder_named_like_a_data_file_is_a_named_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "rows.csv").mkdir()
    with pytest.raises(DataError, match=r"data.source: .*rows.csv is a folder, not a .csv file"):
        load_records(_data(tmp_path / "rows.csv", columns={"instruction": "q", "response": "a", "label": "t"}))


def test_an_instruction_template_builds_the_user_turn(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The task stated in the user turn, after the row's text (so left truncation keeps it)."""
    path = tmp_path / "rows.jsonl"
    pd.DataFrame(ROWS).to_json(path, orient="records", lines=True)
    records = load_records(_data(path, instruction_template="{instruction}. {input}\n\nWhich topic? {{x}}"))
    assert records[1]["messages"][0] == {"role": "user", "content": "q1. ctx\n\nWhich topic? {x}"}
    assert records[0]["messages"][0]["content"] == "q0. \n\nWhich topic? {x}"  # an empty input is empty text
    generated = load_records(_data("synthetic", instruction_template="{instruction} Which topic?"))
    assert "Which topic" not in generated[0]["messages"][0]["content"]  # the generator's prompts are its own


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{title}", r"unknown placeholder\(s\) \['title'\]"),
        ("{input}", "must hold {instruction}"),
        ("{instruction} {", "Single '{' encountered"),
    ],
)
def test_a_bad_instruction_template_is_named(template, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=rf"data.instruction_template[\s\S]*{message}"):
        build_config({"data": {"instruction_template": template}})


def test_the_readmes_synthetic_runs_pass_the_preflight_over_the_default_params() -> None:
    """params.yaml maps AG News's columns; `-s data.source=synthetic` (and the README's DPO line)
    must not be refused for them: the generated set's columns are its own."""
    import re
    import shlex
    from pathlib import Path

    from fedtune.config.schema import load_config
    from flows.common import preflight

    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text().replace("\\\n", " ")  # continued lines joined
    (line,) = [x for x in readme.splitlines() if x.startswith(".venv/bin/fedtune run -s data.source=synthetic")]
    words = shlex.split(line.split("#")[0])
    documented = [words[i + 1] for i, w in enumerate(words) if w == "-s"]
    for overrides in (["data.source=synthetic"], documented):
        preflight(load_config(root / "params.yaml", overrides))
    assert re.search(r"train.objective=dpo", line)
