"""The dataset sink: scored messages into per-conversation files, whole conversations out."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
from collections import deque
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import Field
from quixstreams.sinks import BatchingSink, SinkBatch

from supportsim.datasets.rows import (
    COMPLETE_COLUMN,
    chat_record,
    jsonl,
    logger,
    message_row,
    summarize,
)
from supportsim.settings import ServiceSettings


class DatasetSettings(ServiceSettings):
    """Settings of the dataset_sink service."""

    service_name: str = "dataset_sink"
    dataset_dir: str | None = Field(
        None,
        description="Folder the finished conversations are appended to (JSON Lines); unset: the"
        " sink does not run.",
    )
    dataset_include_failed_endings: bool = Field(
        False,
        description="true: conversations that ended in error or loop count as complete"
        " (default: incomplete).",
    )
    # as the aggregator's: a conversation's rows or written-marker outlive its last message by this
    conversation_retention_s: int = Field(
        86_400,
        ge=1,
        description="Seconds a conversation's state outlives its last message (as"
        " redis_aggregator's).",
    )


def dataset_sink_enabled(env: dict[str, str]) -> str | None:
    """For `supportsim up`: None when the sink should run, else why it is skipped."""
    if env.get("DATASET_DIR") or os.environ.get("DATASET_DIR"):
        return None
    return "DATASET_DIR is not set (set it to a folder to collect finished conversations)"


_ID_PATTERN = re.compile(rb'^\{"conversation_id": "([^"]+)"')


class ConversationFiles:
    """Finished conversations appended to JSON Lines files, each exactly once, crash-safely.

    Files in `directory`: `messages.jsonl` (one row per message), `conversations.jsonl` (one
    summary per conversation), `chat.jsonl` (one chat record per conversation). A lock file lets
    several writers share the folder; the ids of the last `remember` conversations are kept to
    skip a redelivered conversation (redelivery only repeats the last unconfirmed batch).
    """

    FILES = ("messages.jsonl", "conversations.jsonl", "chat.jsonl")
    COMMITTED = ".committed.json"

    def __init__(
        self, directory: str | Path, remember: int = 100_000, include_failed_endings: bool = False
    ):
        self.directory = Path(directory)
        self.remember = remember
        self.include_failed_endings = include_failed_endings
        self._recent: deque[str] = deque()
        self._known: set[str] = set()
        self._scanned_to = 0  # bytes of conversations.jsonl whose ids are known
        self.written = 0
        self.skipped = 0

    def open(self) -> None:
        """Create the folder, cut off any torn write, and learn the ids already written."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._sync()

    def append(self, conversations: Iterable[list[dict[str, Any]]]) -> int:
        """Write each conversation (its message rows) not written before; return how many."""
        with self._locked():
            committed = self._sync()
            blocks = {name: [] for name in self.FILES}
            new_ids: dict[str, None] = {}  # insertion-ordered set
            for rows in conversations:
                summary = summarize(rows, self.include_failed_endings)
                cid = summary["conversation_id"]
                if cid in self._known or cid in new_ids:
                    self.skipped += 1
                    continue
                new_ids[cid] = None
                ordered = sorted(rows, key=lambda row: row["turn"])
                complete = summary["complete"]
                blocks["messages.jsonl"].extend(
                    jsonl({**row, COMPLETE_COLUMN: complete}) for row in ordered
                )
                blocks["conversations.jsonl"].append(jsonl(summary))
                blocks["chat.jsonl"].append(jsonl(chat_record(summary, ordered)))
            if not new_ids:
                return 0
            for name, lines in blocks.items():
                with open(self.directory / name, "ab") as file:
                    file.write("".join(lines).encode())
                    file.flush()
                    os.fsync(file.fileno())
                    committed[name] = file.tell()
            self._commit(committed)
            self._scanned_to = committed["conversations.jsonl"]
            for cid in new_ids:
                self._remember(cid)
            self.written += len(new_ids)
            return len(new_ids)

    @contextlib.contextmanager
    def _locked(self):
        with open(self.directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _sync(self) -> dict[str, int]:
        """Cut every file back to its committed size; learn ids committed by any writer."""
        path = self.directory / self.COMMITTED
        committed = json.loads(path.read_text()) if path.exists() else {}
        if not committed and any(
            (self.directory / name).exists() and (self.directory / name).stat().st_size
            for name in self.FILES
        ):
            raise RuntimeError(
                f"{self.directory} holds dataset files not written by dataset_sink "
                f"(no {self.COMMITTED}); point DATASET_DIR at an empty or sink-owned folder"
            )
        for name in self.FILES:
            size = committed.setdefault(name, 0)
            file = self.directory / name
            actual = file.stat().st_size if file.exists() else 0
            if actual > size:
                logger.warning(
                    "%s: cutting off %s bytes of an unconfirmed write", name, actual - size
                )
                with open(file, "r+b") as handle:
                    handle.truncate(size)
                    os.fsync(handle.fileno())
            elif actual < size:
                raise RuntimeError(f"{file} is shorter than recorded in {path}: edited by hand?")
        end = committed["conversations.jsonl"]
        if end > self._scanned_to:
            with open(self.directory / "conversations.jsonl", "rb") as file:
                file.seek(self._scanned_to)
                for line in file.read(end - self._scanned_to).splitlines():
                    if match := _ID_PATTERN.match(line):
                        self._remember(match.group(1).decode())
            self._scanned_to = end
        return committed

    def _commit(self, committed: dict[str, int]) -> None:
        path = self.directory / self.COMMITTED
        temporary = path.with_suffix(".tmp")
        with open(temporary, "w") as file:
            json.dump(committed, file, sort_keys=True)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _remember(self, cid: str) -> None:
        if cid in self._known:
            return
        self._known.add(cid)
        self._recent.append(cid)
        if len(self._recent) > self.remember:
            self._known.discard(self._recent.popleft())


class DatasetSink(BatchingSink):
    """A Quix Streams sink writing finished conversations to a dataset folder.

    Each value it receives is `{"conversation_id": ..., "rows": [message rows]}`; a batch is
    written when Quix Streams checkpoints, before the consumed offsets are committed.
    """

    def __init__(self, directory: str | Path, include_failed_endings: bool = False):
        super().__init__()
        self.files = ConversationFiles(directory, include_failed_endings=include_failed_endings)

    def setup(self) -> None:
        """Open the folder (cut torn writes, learn the conversations already written)."""
        self.files.open()

    def write(self, batch: SinkBatch) -> None:
        """Append the batch's conversations, skipping any already written."""
        written = self.files.append(item.value["rows"] for item in batch)
        if written:
            logger.info("wrote %s finished conversation(s) to %s", written, self.files.directory)


def collect_conversation(
    row: dict[str, Any], state, retention: timedelta | None = None
) -> dict[str, Any] | None:
    """Keep a conversation's rows in state until its final message, then hand them on once.

    Both the rows of a conversation in progress and the marker of one already handed on expire
    `retention` after the conversation's last message (in event time, as the aggregator's state):
    an abandoned conversation is dropped, and only a repeat within the retention is recognised.
    """
    if state.get("done", False):
        return None  # a late or repeated message of a conversation already written
    rows = state.get("rows", [])
    if any(kept["message_id"] == row["message_id"] for kept in rows):
        return None
    rows.append(row)
    if not row["final"]:
        state.set("rows", rows, ttl=retention)
        return None
    state.delete("rows")
    state.set("done", True, ttl=retention)
    return {"conversation_id": row["conversation_id"], "rows": rows}


def run_dataset_sink(settings: DatasetSettings | None = None) -> None:
    """Run the dataset sink until SIGTERM: every finished conversation lands in DATASET_DIR."""
    from quixstreams.context import message_context

    from supportsim.contract.messages import ScoredMessage
    from supportsim.kafka.app import make_app
    from supportsim.kafka.dead_letters import validated
    from supportsim.logs import configure_logging

    settings = settings or DatasetSettings()
    configure_logging(settings.log_level, settings.service_name)
    if not settings.dataset_dir:
        raise SystemExit("dataset_sink: set DATASET_DIR to the folder to write the dataset to")
    app, topics = make_app(settings, group="dataset-sink")

    def to_row(message: dict[str, Any]) -> dict[str, Any]:
        ctx = message_context()
        return message_row(message, ctx.partition, ctx.offset)

    sdf = validated(app.dataframe(topics.scored), ScoredMessage, topics, settings.service_name)
    retention = timedelta(seconds=settings.conversation_retention_s)
    collect = functools.partial(collect_conversation, retention=retention)
    sdf = sdf.apply(to_row).apply(collect, stateful=True)
    sink = DatasetSink(settings.dataset_dir, settings.dataset_include_failed_endings)
    sdf.filter(lambda value: value is not None).sink(sink)
    logger.info(
        "writing finished conversations from %s to %s", topics.scored.name, settings.dataset_dir
    )
    app.run()
