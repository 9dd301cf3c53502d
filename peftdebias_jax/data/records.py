"""Read a data file into records (dicts), with errors that name the file, line and field.

Local files by suffix: .jsonl / .json (one object per line, or one JSON array), .csv,
.tsv, .parquet, .txt (one text per line, field "text"). A hub dataset is named
`hf:<name>[:<config>]@<split>` and read with `datasets.load_dataset` (online only).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftdebias_jax.errors import ConfigError

csv.field_size_limit(sys.maxsize)


class DataError(ConfigError):
    """A data file is missing, empty or malformed; the message names file, line and field."""


def read_records(source: str | Path) -> list[dict[str, Any]]:
    """All records of a local file or `hf:` dataset split."""
    text = str(source)
    if text.startswith("hf:"):
        return read_hub(text)
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = read_json_lines(path)
    elif suffix in (".csv", ".tsv"):
        records = read_delimited(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    elif suffix == ".txt":
        lines = utf8_text(path).splitlines()
        records = [{"text": line} for line in lines if line.strip()]
    else:
        raise DataError(
            f"{path}: unsupported file type {suffix!r} (jsonl, json, csv, tsv, parquet, txt)"
        )
    if not records:
        raise DataError(f"{path}: no records (empty file)")
    return records


def utf8_text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are an error naming the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the file "
            "as UTF-8"
        ) from None


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    content = utf8_text(path)
    stripped = content.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(content)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {err.lineno}: not valid JSON: {err.msg}") from None
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataError(f"{path}: item {i} is not a JSON object")
        return records
    records = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: not valid JSON: {err.msg}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object")
        record["__line__"] = number
        records.append(record)
    return records


def read_delimited(path: Path, delimiter: str) -> list[dict[str, Any]]:
    with io.StringIO(utf8_text(path), newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if not reader.fieldnames:
            raise DataError(f"{path}: no header line")
        records = []
        for record in reader:
            line = reader.line_num
            if None in record or any(v is None for v in record.values()):
                raise DataError(
                    f"{path}, line {line}: expected {len(reader.fieldnames)} fields "
                    f"({', '.join(reader.fieldnames)})"
                )
            record["__line__"] = line
            records.append(record)
    return records


def read_hub(source: str) -> list[dict[str, Any]]:
    spec, _, split = source[len("hf:") :].partition("@")
    name, _, config = spec.partition(":")
    try:
        import datasets

        dataset = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as err:
        raise DataError(
            f"{source}: could not load the hub dataset ({type(err).__name__}: {err}); "
            "offline, pass a local file instead"
        ) from None
    return [dict(row) for row in dataset]


def where(record: dict[str, Any], source: str | Path) -> str:
    """'file, line N' for error messages."""
    line = record.get("__line__")
    return f"{source}, line {line}" if line else str(source)


def column(
    records: Sequence[dict[str, Any]], name: str | None, source: str | Path, default_first=True
) -> list[Any]:
    """The values of one field; `name=None` picks "text" if present, else the first field."""
    name = column_name(records, name, source, default_first)
    values = []
    for record in records:
        if name not in record or record[name] is None:
            raise DataError(f"{where(record, source)}: field {name!r} is missing")
        values.append(record[name])
    return values


def column_name(
    records: Sequence[dict[str, Any]], name: str | None, source: str | Path, default_first=True
) -> str | None:
    """`name`, which must be a column; None: "text" if present, else the first column."""
    fields = [k for k in records[0] if k != "__line__"]
    if name is None:
        name = "text" if "text" in fields else (fields[0] if default_first else None)
    if name not in fields:
        raise DataError(f"{source}: no column {name!r}; the columns are {fields}")
    return name


def texts(source: str | Path, name: str | None = None) -> list[str]:
    """The text column of a file (the reference code: "text", else the first column)."""
    records = read_records(source)
    used = column_name(records, name, source)
    guessed = "" if name or used == "text" else " (no 'text' column, so the first one; name it"
    guessed += ", e.g. config.upstream.text_column)" if guessed else ""
    values = column(records, used, source)
    for record, value in zip(records, values, strict=True):
        if not isinstance(value, str):
            raise DataError(f"{where(record, source)}: field {used!r} is not text{guessed}")
    return values
