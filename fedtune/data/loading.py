"""Load a data source into normalized chat records, through the configured column mapping.

Every record becomes `{"messages": [...], "label": ...}` whose last message is the assistant
response to learn; the rest is the prompt. Preference data adds `"rejected"` (the dispreferred
response, for DPO); raw text for continued pre-training is `{"text": ..., "label": ...}` instead.
Unknown or missing columns fail before any work.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, cast

from fedtune.config.schema import ColumnMapping, DataSection
from fedtune.core.errors import InputError
from fedtune.data.synthetic import generate

Record = dict[str, Any]
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
log = logging.getLogger(__name__)


class DataError(InputError):
    pass


Row = dict[str, Any]


def _decoded(path: Path, encoding: str) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"data.source: {path} is empty")
    try:
        return raw.decode(encoding).removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        raise DataError(
            f"data.source: {path} is not {encoding} (byte 0x{raw[error.start]:02x} at offset {error.start}); "
            "set data.encoding to the file's encoding, for example latin-1 or utf-16"
        ) from None


def _json(text: str) -> Any:
    """JSON with every number kept as the text written (`0.50` stays `0.50`, not 0.5) and true /
    false as written; NaN and Infinity (not JSON) are refused."""

    def refuse(constant: str) -> None:
        raise json.JSONDecodeError(f"{constant} is not a JSON value", constant, 0)

    return json.loads(text, parse_float=str, parse_int=str, parse_constant=refuse)


def _read_text_file(path: Path, encoding: str) -> list[tuple[int, Row]]:
    """(line number, row) of a CSV or JSON(L) file, read with the standard library's csv and json.

    Not through `datasets.load_dataset`: its CSV builder goes through pandas, which turns `007`
    into 7, `+49` into 49.0 and `NA` or `null` into a missing value (datasets#4467), and its JSON
    builder infers one type per column; here every CSV cell stays the string written, and a line
    that cannot be read is named by its number."""
    text = _decoded(path, encoding)
    rows: list[tuple[int, Row]] = []
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)  # an unclosed quote is an error
        try:
            header = reader.fieldnames or []
            repeated = sorted({name for name in header if header.count(name) > 1})
            if repeated:
                raise DataError(f"data.source: {path} line 1 names columns more than once: {repeated}")
            for row in reader:
                if None in row:  # cells past the header's last column (csv.DictReader's restkey)
                    raise DataError(
                        f"data.source: {path} line {reader.line_num} has {len(header) + len(row[None])} cells, "
                        f"the header {len(header)} (an unquoted comma in a value?)"
                    )
                rows.append((reader.line_num, row))
        except csv.Error as error:
            raise DataError(  # the reader's line count stops where the broken record starts
                f"data.source: {path}: the record starting at line {reader.line_num + 1} cannot be read as CSV "
                f"({error}; an unclosed quote?)"
            ) from None
        if not rows:
            raise DataError(f"data.source: {path} has a header but no rows")
        return rows
    if path.suffix == ".json":
        try:
            data = _json(text)
        except json.JSONDecodeError as error:
            raise DataError(f"data.source: {path} line {error.lineno} is not valid JSON ({error.msg})") from None
        lines = [(0, row) for row in data] if isinstance(data, list) else []
    else:
        lines = []
        # split at newlines only: str.splitlines would also split at U+2028 or a form feed inside a string
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                lines.append((number, _json(line)))
            except json.JSONDecodeError as error:
                raise DataError(
                    f"data.source: {path} line {number} is not valid JSON ({error.msg}, column {error.colno})"
                ) from None
    for number, row in lines:
        if not isinstance(row, dict):
            raise DataError(f"data.source: {path} line {number} is not a JSON object with one field per column")
    if not lines:
        raise DataError(f"data.source: {path} holds no rows (a JSON list of objects, or one object per line)")
    return lines


def _load_rows(section: DataSection) -> list[tuple[int, Row]]:
    """(line number or 0, row) of the configured source."""
    # imported here: it costs 0.45 s of start-up in every process that only reads JSONL partitions
    # (each client's round, most commands)
    import datasets

    path = Path(section.source).expanduser()
    if path.suffix in FILE_BUILDERS:
        if not path.exists():
            raise DataError(f"data.source: file {path} does not exist")
        if path.is_dir():
            raise DataError(f"data.source: {path} is a folder, not a {path.suffix} file")
        if path.suffix != ".parquet":
            return _read_text_file(path, section.encoding)
        try:
            dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
        except Exception as error:  # pyarrow's many error types for an unreadable file
            raise DataError(f"data.source: {path} is not a readable Parquet file ({error})") from None
    elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if section.split not in loaded:
                raise DataError(f"data.split: {section.split!r} not in {list(loaded)}")
            loaded = loaded[section.split]
        dataset = loaded
    else:
        try:
            dataset = datasets.load_dataset(section.source, split=section.split)
        except Exception as error:  # datasets raises many types for "not found / offline"
            raise DataError(f"data.source: cannot load {section.source!r} ({type(error).__name__}: {error})") from None
    return [(0, row) for row in dataset.to_list()]


def check_columns(section: DataSection, available: list[str]) -> None:
    """All mapped columns must exist (`input` is optional); one error lists every missing one."""
    from fedtune.core.catalog import PARTITIONERS

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


class _Missing(Exception):
    """A row without a value (null, empty or absent) where the mapping needs one."""

    def __init__(self, field: str, column: str) -> None:
        self.field, self.column = field, column


def _text(row: Row, field: str, column: str) -> str:
    """The cell as text exactly as written (JSON numbers are read as their text, true/false as
    written); null or empty is missing."""
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _Missing(field, column)
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)


def _to_record(row: Row, section: DataSection, label_column: str | None) -> Record:
    cols = section.columns
    label = _text(row, "columns.label", label_column) if label_column else None
    if cols.text:
        return {"text": _text(row, "columns.text", cols.text), "label": label}
    if cols.messages:
        turns = row.get(cols.messages)
        if not turns:
            raise _Missing("columns.messages", cols.messages)
        if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t.get("role"), str) for t in turns
        ):
            raise DataError(
                f"data.columns.messages: {cols.messages!r} must hold a list of {{role, content}} turns, "
                f"got {str(turns)[:80]}"
            )
        messages = [{"role": t["role"], "content": _text(t, "columns.messages", "content")} for t in turns]
        if messages[-1]["role"] != "assistant":
            raise DataError(f"data.columns.messages: a conversation does not end with an assistant turn: {messages}")
    else:
        # the config guarantees instruction and response are set when messages is not
        user = _text(row, "columns.instruction", cast(str, cols.instruction))
        extra = row.get(cols.input) if cols.input else None
        if section.instruction_template is not None:
            user = section.instruction_template.format(instruction=user, input="" if extra is None else str(extra))
        elif extra is not None and str(extra) != "":
            user = f"{user}\n\n{extra}"
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text(row, "columns.response", cast(str, cols.response))},
        ]
    record: Record = {"messages": messages, "label": label}
    if cols.rejected:
        record["rejected"] = _text(row, "columns.rejected", cols.rejected)
    return record


def as_loaded(section: DataSection) -> DataSection:
    """The section as the loader applies it. The synthetic source's columns and prompts are its
    generator's own, whatever a mapping or template for another source (params.yaml's) says; only
    which of them to use (the near misses for DPO) is the user's choice."""
    if section.source != "synthetic":
        return section
    return section.model_copy(
        update={"columns": ColumnMapping(rejected=section.columns.rejected), "instruction_template": None}
    )


def load_records(section: DataSection) -> list[Record]:
    """Normalized records of the configured source (`data.source`: a file, a saved dataset, a hub
    name or `synthetic`, the project's generated skill set).

    A row whose mapped instruction, response, rejected response or label is null or empty stops
    the load with an error naming its row and line (or, with `data.drop_incomplete`, is dropped
    and counted); nothing is trained on the text "None". Raises DataError."""
    section = as_loaded(section)
    if section.source == "synthetic":
        syn = section.synthetic
        rows = [(0, row) for row in generate(syn.skills, syn.examples_per_skill, syn.seed)]
    else:
        rows = _load_rows(section)
    available = list(dict.fromkeys(key for _, row in rows for key in row if isinstance(key, str)))
    check_columns(section, available)
    if section.max_examples is not None:
        rows = rows[: section.max_examples]
    if not rows:
        raise DataError(f"data.source: {section.source!r} has no rows")
    label_column = section.partition.column or section.columns.label
    label_column = label_column if label_column in available else None
    records: list[Record] = []
    missing: dict[tuple[str, str], list[str]] = {}  # (field, column) -> where, in file order
    for index, (line, row) in enumerate(rows, 1):
        try:
            records.append(_to_record(row, section, label_column))
        except _Missing as gap:
            missing.setdefault((gap.field, gap.column), []).append(f"row {index}" + (f" (line {line})" if line else ""))
    if missing and not section.drop_incomplete:
        raise DataError(
            "; ".join(
                f"data.{field}: {len(where)} of {len(rows)} rows of {section.source} have no {column!r} value (null or "
                f"empty), e.g. {where[0]}"
                for (field, column), where in missing.items()
            )
            + "; fix them, or set data.drop_incomplete: true to drop such rows"
        )
    if missing:
        counts = {column: len(where) for (_, column), where in missing.items()}
        log.warning(
            "data.drop_incomplete: dropped %d of %d rows without a value: %s", sum(counts.values()), len(rows), counts
        )
    if not records:
        raise DataError(f"data.source: no row of {section.source!r} has every mapped value")
    return records


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
