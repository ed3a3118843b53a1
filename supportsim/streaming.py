"""The Kafka application factory and dead-letter routing every service uses."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

from quixstreams import Application
from quixstreams.context import message_context
from quixstreams.dataframe import StreamingDataFrame
from quixstreams.kafka import Producer
from quixstreams.kafka.configuration import ConnectionConfig
from quixstreams.models import Row

from supportsim.messages import ChatMessage, DeadLetter, dead_letter, parse, to_json
from supportsim.settings import ServiceSettings
from supportsim.topics import Topics, declare_topics

logger = logging.getLogger(__name__)


def connection(settings: ServiceSettings) -> ConnectionConfig | None:
    """The broker connection; None on Quix Cloud, where Quix Streams reads its own token."""
    kafka = settings.kafka
    if kafka.on_quix_cloud:
        return None
    return ConnectionConfig(
        bootstrap_servers=kafka.broker_address,
        security_protocol=kafka.security_protocol,
        sasl_mechanism=kafka.sasl_mechanism,
        sasl_username=kafka.sasl_username,
        sasl_password=kafka.sasl_password,
        ssl_ca_location=kafka.ssl_ca_location,
    )


def make_app(
    settings: ServiceSettings,
    *,
    group: str,
    exactly_once: bool = True,
    **extra: Any,
) -> tuple[Application, Topics]:
    """A Quix Streams application for one service, with the topics declared (and created).

    A processing error that is a bad input (see :func:`is_bad_input`) is logged and sent to the
    dead-letter topic, and the loop keeps going; any other exception stops the application.
    """
    kafka = settings.kafka
    holder: dict[str, Topics] = {}
    group_name = settings.group(group)

    def on_processing_error(exc: Exception, row: Row | None, _logger: logging.Logger) -> bool:
        if row is None:
            logger.exception("processing failed outside a message: %s", exc)
            return False
        if not is_bad_input(exc):
            logger.error(
                "%s on %s[%s]@%s is a bug, not bad input: stopping",
                type(exc).__name__,
                row.topic,
                row.partition,
                row.offset,
            )
            return False
        send_dead_letter(holder["topics"], row, f"{type(exc).__name__}: {exc}", settings)
        return True

    app = Application(
        broker_address=connection(settings),
        consumer_group=group_name,
        auto_offset_reset=settings.auto_offset_reset,
        commit_interval=settings.commit_interval,
        state_dir=settings.state_dir,
        processing_guarantee="exactly-once"
        if exactly_once and kafka.transactional
        else "at-least-once",
        consumer_extra_config={
            "session.timeout.ms": kafka.session_timeout_ms,
            "heartbeat.interval.ms": max(500, kafka.session_timeout_ms // 6),
            "max.poll.interval.ms": kafka.max_poll_interval_ms,
            "isolation.level": kafka.isolation_level,
            "fetch.wait.max.ms": kafka.fetch_wait_max_ms,
        },
        producer_extra_config={"transactional.id": settings.transactional_id_for(group_name)},
        on_processing_error=on_processing_error,
        loglevel=settings.log_level,
        **extra,
    )
    topics = declare_topics(app, settings)
    writer = DeadLetterWriter(app, topics.dead_letters.name)
    holder["topics"] = replace(topics, write_dead_letter=writer.write)
    if app.config.exactly_once:
        fence_predecessor(app)
    return app, holder["topics"]


def is_bad_input(exc: Exception) -> bool:
    """True when a processing error condemns the message, not the code: a `ValueError`.

    pydantic's ValidationError, JSON and Unicode decoding errors, the protocol violations of the
    bots and the aggregator are all ValueErrors; a TypeError, KeyError or AttributeError is a
    programming error, which would dead-letter every message it meets: the service must stop.
    """
    return isinstance(exc, ValueError)


def transactional_producer(app: Application) -> Producer:
    """A transactional producer with the application's own `transactional.id`.

    (`Application.get_producer(transactional=True)` prefixes the id a second time on Quix Cloud,
    so it would not fence the application's producer nor be fenced by it.)
    """
    config = app.config
    return Producer(
        broker_address=config.broker_address,
        extra_config=dict(config.producer_extra_config),
        transactional=True,
    )


def fence_predecessor(app: Application) -> None:
    """End at once any transaction that a crashed predecessor of this replica left open.

    Quix Streams initialises its transactional producer at the first message it writes. A replica
    restarted after a kill would fence its predecessor only then, but a bot reads the topic it
    writes: if its partitions sit behind the predecessor's open transaction, read_committed gives it
    nothing, so it never writes, and every reader of those partitions waits for good. Kafka aborts
    such a transaction after `transaction.timeout.ms`; Tansu never does. Initialising transactions
    with the same `transactional.id` at startup aborts it now (measured on Tansu: the records behind
    it become readable the moment `init_transactions` returns).
    """
    producer = transactional_producer(app)
    try:
        producer.begin_transaction()  # the first use runs init_transactions, which fences
        producer.abort_transaction()
    finally:
        close_producer(producer)
    transactional_id = app.config.producer_extra_config["transactional.id"]
    logger.info("fenced earlier producers with transactional.id %s", transactional_id)


def close_producer(producer: Producer, timeout: float = 10.0) -> int:
    """Deliver what `producer` holds, then free its librdkafka instance now; return undelivered.

    A Quix Streams producer and its librdkafka producer refer to each other (the error
    callback), so dropping it leaves its threads, broker connections and transactional.id alive
    until a garbage collection; dropping the inner producer ends them at once.
    """
    left = producer.flush(timeout)
    producer._inner_producer = None  # noqa: SLF001 (Quix Streams' Producer has no close)
    return left


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
