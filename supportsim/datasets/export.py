"""`supportsim export` and `supportsim compare`: datasets and model comparisons from `chat-scored`.

Export reads the scored topic to its end as found when reading begins (so it ends on a live
topic; the rule is in `supportsim.kafka.reader`), with the configured `isolation.level`
(`KAFKA_ISOLATION_LEVEL`), and writes one row per message and one summary per conversation as
CSV, JSON Lines and optionally Parquet, plus chat-format JSON Lines for fine-tuning.

Memory stays flat however long the topic: the reader's prefetch is capped, and message rows are
spilled to a temporary SQLite file in the output folder, which also sorts them. Only one
conversation at a time is held in memory, when it is summarized and when it is written. Output is
deterministic: conversations sorted by first timestamp then id, messages of a conversation in
topic order (partition, offset), so exporting the same topic twice gives byte-identical files.

Compare reads two scored topics (say the live one and a back-fill re-scored with another model)
and prints, for the messages present in both (matched by `message_id`), overall agreement,
Cohen's kappa, per-label agreement and the confusion table, plus counts of messages in only one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sqlite3
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import groupby
from pathlib import Path
from typing import Any

from supportsim.contract.messages import DeadLetter, ScoredMessage, parse_scored, to_json
from supportsim.datasets.rows import (
    COMPLETE_COLUMN,
    CONVERSATION_COLUMNS,
    MESSAGE_COLUMNS,
    POSITION_COLUMNS,
    chat_record,
    extra_columns,
    message_row,
    summarize,
)
from supportsim.datasets.writers import JsonlRows, open_writers
from supportsim.kafka.reader import Record, TopicRead, TopicReader, TopicReadError
from supportsim.settings import ServiceSettings

logger = logging.getLogger(__name__)

FORMATS = ("csv", "jsonl", "parquet")
LABELS = ("negative", "neutral", "positive")
CLOCK_SKEW_MS = 5 * 60 * 1000  # --since seeks by Kafka timestamp; allow for producer clock skew
SERVICE = "supportsim-export"
OUTPUT_FILES = {
    *(f"{stem}.{ext}" for stem in ("messages", "conversations") for ext in FORMATS),
    "chat.jsonl",
    "rejected.jsonl",
    "manifest.json",
}


class ExportError(RuntimeError):
    """A problem the user can fix (a missing topic, a bad option); the message says which."""


# --- options --------------------------------------------------------------------------------


def parse_time(text: str) -> int:
    """A point in time as UTC epoch milliseconds: epoch ms digits, or an ISO 8601 timestamp.

    A timestamp without a zone is read as UTC; a date alone means its midnight (UTC).
    """
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise ExportError(
            f"not a time: {text!r} (use epoch milliseconds or ISO 8601, e.g. 2026-11-03T14:00:00Z)"
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def parse_formats(text: str) -> tuple[str, ...]:
    """`csv,jsonl,parquet` as a tuple in canonical order; parquet only with pyarrow installed."""
    wanted = {part.strip().lower() for part in text.split(",") if part.strip()}
    unknown = wanted - set(FORMATS)
    if unknown or not wanted:
        raise ExportError(f"--format takes a list of {', '.join(FORMATS)}; got {text!r}")
    if "parquet" in wanted:
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise ExportError(
                "Parquet output needs pyarrow: `.venv/bin/pip install pyarrow==26.0.1`, "
                "or leave parquet out of --format"
            ) from exc
    return tuple(name for name in FORMATS if name in wanted)


def read_conversation_ids(path: str | Path) -> set[str]:
    """Conversation ids from a file: one a line; blank lines and `#` comments are ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ExportError(f"cannot read --conversations-file {path}: {exc}") from exc
    return {line.split("#", 1)[0].strip() for line in lines} - {""}


@dataclass
class ExportOptions:
    """What to export and where (the `supportsim export` options)."""

    out: Path
    topic: str | None = None  # default: SCORED_TOPIC
    since_ms: int | None = None
    until_ms: int | None = None
    conversations: frozenset[str] | None = None
    complete_only: bool = False
    include_failed_endings: bool = False  # count `error` and `loop` endings as complete
    chat_jsonl: bool = False
    formats: tuple[str, ...] = ("csv", "jsonl")
    progress: bool = True
    stall_timeout: float = 30.0

    def wants(self, conversation_id: str, timestamp_ms: int) -> bool:
        """True when a message passes the time range and conversation filters."""
        if self.since_ms is not None and timestamp_ms < self.since_ms:
            return False
        if self.until_ms is not None and timestamp_ms >= self.until_ms:
            return False
        return self.conversations is None or conversation_id in self.conversations


# --- progress --------------------------------------------------------------------------------


class ProgressBar:
    """A progress bar on stderr (offsets read / offsets to read), or nothing when disabled."""

    def __init__(self, enabled: bool, description: str):
        self._bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import (
            Progress as RichProgress,
        )

        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self._task = self._bar.add_task(description, total=None)
        self._bar.start()

    def update(self, done: int, total: int | None) -> None:
        """Show `done` of `total` offsets."""
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)

    def close(self) -> None:
        """Remove the live display (the last state stays on screen)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def rejection_reason(error: str) -> str:
    """A dead letter's error without the per-record details, for counting by kind."""
    if error.startswith("key "):
        return "key does not match conversation_id"
    return error.split(":", 1)[0]


# --- spilling and sorting on disk -----------------------------------------------------------


class ConversationStore:
    """Message rows spilled to a temporary SQLite file, grouped and sorted there, not in memory.

    Rows are deduplicated by `message_id` (a message redelivered or re-produced after an aborted
    transaction is kept once, the first time it was read). A conversation that ended in `error`
    or `loop` is summarized as incomplete unless `include_failed_endings`.
    """

    def __init__(self, path: Path, include_failed_endings: bool = False):
        self.include_failed_endings = include_failed_endings
        self.db = sqlite3.connect(path, isolation_level=None)
        for pragma in (
            "journal_mode = OFF",
            "synchronous = OFF",
            "temp_store = FILE",
            "cache_size = -2000",  # KiB: the page cache is the store's memory
        ):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(
            """
            CREATE TABLE messages (
                message_id TEXT PRIMARY KEY, conversation_id TEXT NOT NULL,
                part INTEGER NOT NULL, off INTEGER NOT NULL, row TEXT NOT NULL
            ) WITHOUT ROWID;
            CREATE TABLE conversations (
                conversation_id TEXT PRIMARY KEY, first_ts INTEGER NOT NULL,
                complete INTEGER NOT NULL, row TEXT NOT NULL
            ) WITHOUT ROWID;
            CREATE TABLE rejected (
                part INTEGER, off INTEGER, key TEXT, error TEXT, value TEXT
            );
            """
        )
        self._pending: list[tuple] = []
        self.added = 0
        self.duplicates = 0

    def add(self, row: dict[str, Any]) -> None:
        """Queue one message row for insertion."""
        self._pending.append(
            (
                row["message_id"],
                row["conversation_id"],
                row["kafka_partition"],
                row["kafka_offset"],
                json.dumps(row, ensure_ascii=False),
            )
        )
        if len(self._pending) >= 500:
            self.flush()

    def reject(self, letter: DeadLetter) -> None:
        """Keep a record that is not a valid scored message (its value cut to 1,000 chars)."""
        self.db.execute(
            "INSERT INTO rejected VALUES (?, ?, ?, ?, ?)",
            (letter.partition, letter.offset, letter.key, letter.error, letter.value[:1000]),
        )

    def flush(self) -> None:
        """Insert queued rows; a message_id seen before is counted as a duplicate."""
        if not self._pending:
            return
        before = self.db.total_changes
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?)", self._pending)
        self.db.execute("COMMIT")
        inserted = self.db.total_changes - before
        self.added += inserted
        self.duplicates += len(self._pending) - inserted
        self._pending.clear()

    def summarize(self) -> None:
        """Summarize every conversation, one at a time, into the conversations table."""
        self.flush()
        self.db.execute(
            "CREATE INDEX messages_by_conversation ON messages (conversation_id, part, off)"
        )
        reader = self.db.execute(
            "SELECT conversation_id, row FROM messages ORDER BY conversation_id, part, off"
        )
        batch = []
        self.db.execute("BEGIN")
        for _cid, items in groupby(reader, key=lambda item: item[0]):
            rows = [json.loads(row) for _, row in items]
            summary = summarize(rows, self.include_failed_endings)
            batch.append(
                (
                    summary["conversation_id"],
                    summary["started_ms"],
                    int(summary["complete"]),
                    json.dumps(summary, ensure_ascii=False),
                )
            )
            if len(batch) >= 1000:
                self.db.executemany("INSERT INTO conversations VALUES (?, ?, ?, ?)", batch)
                batch.clear()
        self.db.executemany("INSERT INTO conversations VALUES (?, ?, ?, ?)", batch)
        self.db.execute("COMMIT")
        self.db.execute(
            "CREATE INDEX conversations_in_order ON conversations (first_ts, conversation_id)"
        )

    def counts(self) -> tuple[int, int]:
        """(complete, incomplete) conversations."""
        complete, total = self.db.execute(
            "SELECT coalesce(sum(complete), 0), count(*) FROM conversations"
        ).fetchone()
        return complete, total - complete

    def conversations(self, complete_only: bool) -> Iterator[dict[str, Any]]:
        """Summary rows in output order (first timestamp, then id)."""
        query = "SELECT row FROM conversations"
        query += " WHERE complete = 1" if complete_only else ""
        for (row,) in self.db.execute(query + " ORDER BY first_ts, conversation_id"):
            yield json.loads(row)

    def messages(self, complete_only: bool) -> Iterator[tuple[bool, dict[str, Any]]]:
        """(conversation complete, message row), conversations in output order, messages in
        topic order within each."""
        query = (
            "SELECT c.complete, m.row FROM conversations AS c"
            " CROSS JOIN messages AS m ON m.conversation_id = c.conversation_id"
        )
        query += " WHERE c.complete = 1" if complete_only else ""
        query += " ORDER BY c.first_ts, c.conversation_id, m.part, m.off"
        for complete, row in self.db.execute(query):
            yield bool(complete), json.loads(row)

    def rejected(self) -> Iterator[dict[str, Any]]:
        """Rejected records in topic order."""
        for part, off, key, error, value in self.db.execute(
            "SELECT part, off, key, error, value FROM rejected ORDER BY part, off, rowid"
        ):
            yield {"partition": part, "offset": off, "key": key, "error": error, "value": value}

    def close(self) -> None:
        """Close the database (the caller removes its folder)."""
        self.db.close()


# --- writing rows ---------------------------------------------------------------------------


# --- export ---------------------------------------------------------------------------------


@dataclass
class ExportReport:
    """What an export read and wrote."""

    out: Path
    topic: str
    files: list[str]
    records_read: int = 0
    messages: int = 0
    conversations: int = 0
    complete: int = 0
    incomplete: int = 0
    skipped_incomplete: int = 0
    duplicates: int = 0
    outside_filter: int = 0
    bad_records: int = 0
    bad_reasons: dict[str, int] = field(default_factory=dict)
    offsets: dict[str, list[int]] = field(default_factory=dict)
    stalled_partitions: list[int] = field(default_factory=list)
    # per partition: offsets left behind a transaction still open (read_committed readers)
    held_back: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """A few lines for the terminal."""
        lines = [
            f"exported {self.messages} messages in {self.conversations} conversations "
            f"({self.complete} complete, {self.incomplete} incomplete"
            + (f", {self.skipped_incomplete} incomplete skipped" if self.skipped_incomplete else "")
            + f") from {self.topic} to {self.out}",
            f"files: {', '.join(self.files)}",
        ]
        if self.bad_records:
            kinds = ", ".join(f"{count} {reason}" for reason, count in self.bad_reasons.items())
            plural = "s" if self.bad_records != 1 else ""
            lines.append(
                f"{self.bad_records} bad record{plural} skipped ({kinds}); see rejected.jsonl"
            )
        if self.duplicates:
            lines.append(f"{self.duplicates} duplicate messages (same message_id) kept once")
        if self.outside_filter:
            lines.append(f"{self.outside_filter} messages outside the time range or conversations")
        if self.stalled_partitions:
            lines.append(
                f"warning: partitions {self.stalled_partitions} stopped short of their end "
                "(an open transaction?); the export may miss their last messages"
            )
        if self.held_back:
            lines.append(
                f"note: {sum(self.held_back.values())} offsets of partitions "
                f"{sorted(int(p) for p in self.held_back)} are in transactions still open; "
                "not exported"
            )
        return "\n".join(lines)


def export(options: ExportOptions, settings: ServiceSettings | None = None) -> ExportReport:
    """Export the scored topic to `options.out`; see the module docstring. Bad records are
    counted, kept in `rejected.jsonl` and skipped; they never stop the export."""
    settings = settings or ServiceSettings()
    formats = parse_formats(",".join(options.formats))
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    store = progress = None
    try:
        store = ConversationStore(work / "spill.sqlite", options.include_failed_endings)
        topic_name = options.topic or settings.scored_topic
        progress = ProgressBar(options.progress, f"reading {topic_name}")
        with TopicReader(settings, purpose="export") as reader:
            reading = reader.read(
                topic_name,
                since_ms=None if options.since_ms is None else options.since_ms - CLOCK_SKEW_MS,
                stall_timeout=options.stall_timeout,
                on_progress=progress.update,
            )
            extras, bad, outside = _read_rows(reading, store, options)
        progress.close()
        store.summarize()
        complete, incomplete = store.counts()
        report = ExportReport(
            out=out,
            topic=reading.topic,
            files=[],
            records_read=reading.read,
            complete=complete,
            incomplete=incomplete,
            skipped_incomplete=incomplete if options.complete_only else 0,
            duplicates=store.duplicates,
            outside_filter=outside,
            bad_records=sum(bad.values()),
            bad_reasons=dict(sorted(bad.items(), key=lambda item: (-item[1], item[0]))),
            offsets=reading.offsets(),
            stalled_partitions=reading.stalled,
            held_back={
                str(p): count for p, count in reading.held_back.items() if p not in reading.stalled
            },
        )
        _write_files(store, work, options, formats, sorted(extras), report)
        for name in report.files:
            os.replace(work / name, out / name)
        for name in OUTPUT_FILES - set(report.files):
            (out / name).unlink(missing_ok=True)  # left by an earlier export with other options
        return report
    finally:
        if progress is not None:
            progress.close()
        if store is not None:
            store.close()
        shutil.rmtree(work, ignore_errors=True)


def scored_records(reading: TopicRead) -> Iterator[tuple[Record, ScoredMessage | DeadLetter]]:
    """Each record of a topic read with its parsed scored message, or the dead letter it makes."""
    for record in reading:
        yield (
            record,
            parse_scored(
                record.value,
                service=SERVICE,
                source_topic=reading.topic,
                partition=record.partition,
                offset=record.offset,
                key=record.key,
            ),
        )


def _read_rows(
    reading: TopicRead, store: ConversationStore, options: ExportOptions
) -> tuple[set[str], Counter[str], int]:
    """Spill the rows of a topic read into `store`: (extra columns, bad reasons, outside)."""
    extras: set[str] = set()
    bad: Counter[str] = Counter()
    outside = 0
    try:
        for record, parsed in scored_records(reading):
            if isinstance(parsed, DeadLetter):
                bad[rejection_reason(parsed.error)] += 1
                store.reject(parsed)
                continue
            if not options.wants(parsed.conversation_id, parsed.timestamp_ms):
                outside += 1
                continue
            row = message_row(to_json(parsed), record.partition, record.offset)
            extras.update(extra_columns(row))
            store.add(row)
    except TopicReadError as exc:
        raise ExportError(str(exc)) from exc
    return extras, bad, outside


def _write_files(
    store: ConversationStore,
    work: Path,
    options: ExportOptions,
    formats: tuple[str, ...],
    extras: list[str],
    report: ExportReport,
) -> None:
    message_columns = [*MESSAGE_COLUMNS, *extras, *POSITION_COLUMNS, COMPLETE_COLUMN]
    writers = open_writers(work, "messages", formats, message_columns)
    chat = JsonlRows(work / "chat.jsonl") if options.chat_jsonl else None
    for cid, items in groupby(
        store.messages(options.complete_only), key=lambda item: item[1]["conversation_id"]
    ):
        rows = []
        for complete, row in items:
            row = {**row, COMPLETE_COLUMN: complete}
            for writer in writers.values():
                writer.write(row)
            rows.append(row)
            report.messages += 1
        if chat is not None:
            persona = {**rows[0], "complete": rows[0][COMPLETE_COLUMN], "conversation_id": cid}
            chat.write(chat_record(persona, rows))
    for writer in writers.values():
        writer.close()
    files = list(writers)
    writers = open_writers(work, "conversations", formats, CONVERSATION_COLUMNS)
    for summary in store.conversations(options.complete_only):
        for writer in writers.values():
            writer.write(summary)
        report.conversations += 1
    for writer in writers.values():
        writer.close()
    files += list(writers)
    if chat is not None:
        chat.close()
        files.append("chat.jsonl")
    rejected = JsonlRows(work / "rejected.jsonl")
    for record in store.rejected():
        rejected.write(record)
    rejected.close()
    files.append("rejected.jsonl")
    report.files = [*sorted(files), "manifest.json"]
    manifest = {
        "topic": report.topic,
        "formats": list(formats),
        "complete_only": options.complete_only,
        "include_failed_endings": options.include_failed_endings,
        "chat_jsonl": options.chat_jsonl,
        "since_ms": options.since_ms,
        "until_ms": options.until_ms,
        "conversation_filter": len(options.conversations) if options.conversations else None,
        "offsets": report.offsets,
        "stalled_partitions": report.stalled_partitions,
        "held_back": report.held_back,
        "records_read": report.records_read,
        "bad_records": report.bad_records,
        "bad_reasons": report.bad_reasons,
        "duplicates": report.duplicates,
        "outside_filter": report.outside_filter,
        "messages": report.messages,
        "conversations": report.conversations,
        "complete": report.complete,
        "incomplete": report.incomplete,
        "skipped_incomplete": report.skipped_incomplete,
        "files": report.files,
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


# --- compare --------------------------------------------------------------------------------


# --- command line ---------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    """`supportsim export`: write the dataset files; 2 on a usage or broker problem."""
    try:
        conversations = set(args.conversation or [])
        if args.conversations_file:
            conversations |= read_conversation_ids(args.conversations_file)
        options = ExportOptions(
            out=Path(args.out),
            topic=args.topic,
            since_ms=parse_time(args.since) if args.since else None,
            until_ms=parse_time(args.until) if args.until else None,
            conversations=frozenset(conversations)
            if args.conversation or args.conversations_file
            else None,
            complete_only=args.complete_only,
            include_failed_endings=args.include_failed_endings,
            chat_jsonl=args.chat_jsonl,
            formats=parse_formats(args.format),
            progress=not args.no_progress,
            stall_timeout=args.stall_timeout,
        )
        report = export(options)
    except ExportError as exc:
        print(f"supportsim export: {exc}", file=sys.stderr)
        return 2
    print(report.describe())
    return 0


def add_export_commands(subparsers) -> None:
    """Register the `export` subcommand on the `supportsim` parser."""
    export_parser = subparsers.add_parser(
        "export",
        help="write chat-scored as a dataset (CSV, JSON Lines, Parquet, chat JSON Lines)",
        description=(
            "Read the scored topic up to its current end and write one row per message "
            "(messages.*), one summary per conversation (conversations.*), rejected.jsonl and "
            "manifest.json to --out. Incomplete conversations are kept, flagged complete=false; "
            "a conversation that ended in error or loop counts as incomplete."
        ),
    )
    export_parser.add_argument("--out", default="dataset", help="output folder (default: dataset)")
    export_parser.add_argument("--topic", help="scored topic to read (default: SCORED_TOPIC)")
    export_parser.add_argument("--since", help="from this time on (ISO 8601 or epoch ms)")
    export_parser.add_argument("--until", help="before this time (ISO 8601 or epoch ms)")
    export_parser.add_argument(
        "--conversation", action="append", metavar="ID", help="only this conversation (repeatable)"
    )
    export_parser.add_argument(
        "--conversations-file", metavar="PATH", help="only the conversation ids in PATH, one a line"
    )
    export_parser.add_argument(
        "--complete-only", action="store_true", help="leave out incomplete conversations"
    )
    export_parser.add_argument(
        "--include-failed-endings",
        action="store_true",
        help="count conversations that ended in error or loop as complete (default: incomplete)",
    )
    export_parser.add_argument(
        "--chat-jsonl",
        action="store_true",
        help="also write chat.jsonl: {role, content} messages per conversation for fine-tuning",
    )
    export_parser.add_argument(
        "--format",
        default="csv,jsonl",
        help="comma-separated: csv, jsonl, parquet (parquet needs pyarrow; default csv,jsonl)",
    )
    export_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    export_parser.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        help="give up on the partitions left after N s without progress (default 30)",
    )
    export_parser.set_defaults(func=cmd_export)
