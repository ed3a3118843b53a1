"""The Kafka application factory and dead-letter routing every service uses."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from quixstreams import Application
from quixstreams.kafka.configuration import ConnectionConfig
from quixstreams.models import Row

from supportsim.kafka.dead_letters import DeadLetterWriter, is_bad_input, send_dead_letter
from supportsim.kafka.producers import fence_predecessor
from supportsim.kafka.topics import Topics, declare_topics
from supportsim.settings import KafkaSettings, ServiceSettings

logger = logging.getLogger(__name__)


def connection(kafka: KafkaSettings) -> ConnectionConfig | None:
    """The broker connection; None on Quix Cloud, where Quix Streams reads its own token."""
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
        broker_address=connection(settings.kafka),
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
