"""Dataset file writers: CSV (formula-safe), JSONL and Parquet rows."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from supportsim.datasets.rows import (
    COMPLETE_COLUMN,
    jsonl,
)

# a text cell starting with one of these is run as a formula by spreadsheet programs
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A value as CSV text: empty for null, true/false, JSON for lists and objects.

    Text that a spreadsheet would run as a formula gets a leading `'` (as the dashboard's CSV
    does); JSON Lines and Parquet keep the text as it is.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


class CsvRows:
    """Rows to a CSV file with a fixed header (missing values empty)."""

    def __init__(self, path: Path, columns: list[str]):
        self.file = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self.columns = columns
        self.writer = csv.writer(self.file, lineterminator="\n")
        self.writer.writerow(columns)

    def write(self, row: dict[str, Any]) -> None:
        """Append one row."""
        self.writer.writerow([csv_cell(row.get(column)) for column in self.columns])

    def close(self) -> None:
        """Finish the file."""
        self.file.close()


class JsonlRows:
    """Rows to a JSON Lines file, one object a line, keys in the row's order."""

    def __init__(self, path: Path):
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close)

    def write(self, row: dict[str, Any]) -> None:
        """Append one row."""
        self.file.write(jsonl(row))

    def close(self) -> None:
        """Finish the file."""
        self.file.close()


PARQUET_TYPES = {
    "turn": "int64",
    "timestamp_ms": "int64",
    "prompt_tokens": "int64",
    "completion_tokens": "int64",
    "latency_ms": "int64",
    "final": "bool",
    "sentiment_score": "float64",
    "kafka_partition": "int64",
    "kafka_offset": "int64",
    COMPLETE_COLUMN: "bool",
    "turns": "int64",
    "first_turn": "int64",
    "last_turn": "int64",
    "complete": "bool",
    "first_sentiment": "float64",
    "last_sentiment": "float64",
    "mean_sentiment": "float64",
    "min_sentiment": "float64",
    "customer_first_sentiment": "float64",
    "customer_last_sentiment": "float64",
    "customer_sentiment_change": "float64",
    "total_tokens": "int64",
    "started_ms": "int64",
    "ended_ms": "int64",
    "duration_ms": "int64",
}


class ParquetRows:
    """Rows to a Parquet file in row groups of `group` rows; extra fields are stored as text."""

    def __init__(self, path: Path, columns: list[str], group: int = 5000):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        self.columns = columns
        arrow_type = {
            "int64": pa.int64,
            "float64": pa.float64,
            "bool": pa.bool_,
            "string": pa.string,
        }
        self.schema = pa.schema(
            [(name, arrow_type[PARQUET_TYPES.get(name, "string")]()) for name in columns]
        )
        self.text_columns = [name for name in columns if name not in PARQUET_TYPES]
        self.writer = pq.ParquetWriter(path, self.schema)
        self.group = group
        self.rows: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (written when a row group is full)."""
        cells = {name: row.get(name) for name in self.columns}
        for name in self.text_columns:
            value = cells[name]
            if value is not None and not isinstance(value, str):
                cells[name] = json.dumps(value, ensure_ascii=False, sort_keys=True)
        self.rows.append(cells)
        if len(self.rows) >= self.group:
            self._write_group()

    def _write_group(self) -> None:
        if self.rows:
            self.writer.write_table(self.pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows.clear()

    def close(self) -> None:
        """Write the last row group and finish the file."""
        self._write_group()
        self.writer.close()


def open_writers(
    folder: Path, stem: str, formats: Iterable[str], columns: list[str]
) -> dict[str, Any]:
    """One writer per format for `<stem>.<format>` in `folder`."""
    writers: dict[str, Any] = {}
    for name in formats:
        path = folder / f"{stem}.{name}"
        if name == "csv":
            writers[path.name] = CsvRows(path, columns)
        elif name == "jsonl":
            writers[path.name] = JsonlRows(path)
        else:
            writers[path.name] = ParquetRows(path, columns)
    return writers
