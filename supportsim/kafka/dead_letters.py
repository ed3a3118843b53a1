"""Dead letters: what cannot be processed goes to the dead-letter topic with its reason."""

from __future__ import annotations

import json
import logging
from typing import Any

from quixstreams import Application
from quixstreams.context import message_context
from quixstreams.dataframe import StreamingDataFrame
from quixstreams.kafka import Producer
from quixstreams.models import Row

from supportsim.contract.messages import ChatMessage, DeadLetter, dead_letter, parse, to_json
from supportsim.kafka.producers import close_producer
from supportsim.kafka.topics import Topics
from supportsim.settings import ServiceSettings

logger = logging.getLogger(__name__)


def is_bad_input(exc: Exception) -> bool:
    """True when a processing error condemns the message, not the code: a `ValueError`.

    pydantic's ValidationError, JSON and Unicode decoding errors, the protocol violations of the
    bots and the aggregator are all ValueErrors; a TypeError, KeyError or AttributeError is a
    programming error, which would dead-letter every message it meets: the service must stop.
    """
    return isinstance(exc, ValueError)


class DeadLetterWriter:
    """Writes dead letters at once with one plain producer per application, and waits for them.

    A dead letter is on the broker before the offset of its record can be committed, whatever
    becomes of the processing transaction; if that record is processed again (after a crash), it
    is dead-lettered again: dead letters are at-least-once. One producer serves the application's
    whole life (a producer per dead letter costs about half a second each).
    """

    def __init__(self, app: Application, topic: str, timeout_s: float = 30.0) -> None:
        self._app = app
        self._topic = topic
        self._timeout_s = timeout_s
        self._producer: Producer | None = None

    def write(self, record: DeadLetter, key: bytes | None) -> None:
        """Produce one dead letter and wait until the broker has it (raises if it cannot)."""
        if self._producer is None:
            self._producer = self._app.get_producer()
        self._producer.produce(self._topic, value=record.model_dump_json().encode(), key=key)
        left = self._producer.flush(self._timeout_s)
        if left:
            raise RuntimeError(
                f"{left} dead letter(s) not delivered to {self._topic} within {self._timeout_s} s"
            )

    def close(self) -> None:
        """Free the producer (a later dead letter opens a new one)."""
        if self._producer is not None:
            close_producer(self._producer, self._timeout_s)
            self._producer = None


def send_dead_letter(topics: Topics, row: Row, error: str, settings: ServiceSettings) -> None:
    """Dead-letter a row that failed after validation."""
    value = row.value
    raw = value if isinstance(value, bytes) else json.dumps(value, default=str).encode()
    key = row.key if isinstance(row.key, bytes) else None
    record = dead_letter(
        raw,
        error,
        service=settings.service_name,
        source_topic=row.topic,
        partition=row.partition,
        offset=row.offset,
        key=key,
    )
    report_dead_letter(topics, record, key)


def report_dead_letter(topics: Topics, record: DeadLetter, key: bytes | None) -> None:
    """Log a bad input (where it came from and why) and write its dead letter."""
    logger.warning(
        "dead letter from %s[%s]@%s: %s",
        record.source_topic,
        record.partition,
        record.offset,
        record.error,
    )
    write_dead_letter(topics, record, key)


def write_dead_letter(topics: Topics, record: DeadLetter, key: bytes | None) -> None:
    """Write a dead letter with the application's writer (see :class:`DeadLetterWriter`)."""
    if topics.write_dead_letter is None:
        raise RuntimeError("these topics were not declared by make_app: no dead-letter writer")
    topics.write_dead_letter(record, key)


def validated(
    sdf: StreamingDataFrame,
    model: type[ChatMessage],
    topics: Topics,
    service: str,
) -> StreamingDataFrame:
    """Split a raw-bytes stream into valid messages (returned, as dicts) and dead letters.

    Every invalid value is written to the dead-letter topic with its reason, at once (see
    :class:`DeadLetterWriter`), and goes no further.
    """

    def check(value: bytes, key: bytes | None, _ts: int, _headers: Any) -> dict:
        ctx = message_context()
        parsed = parse(
            model,
            value,
            service=service,
            source_topic=ctx.topic,
            partition=ctx.partition,
            offset=ctx.offset,
            key=key,
        )
        if isinstance(parsed, DeadLetter):
            report_dead_letter(topics, parsed, key)
            return None
        return to_json(parsed)

    return sdf.apply(check, metadata=True).filter(lambda value: value is not None)
