"""Topic definitions with explicit partitions and retention, the same on every broker.

Tansu reports no `retention.ms` for a topic created without it, and Quix Streams' changelog
topics copy it from the source topic, so every topic is created with explicit retention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from quixstreams import Application
from quixstreams.models import TopicConfig
from quixstreams.models.topics import Topic

from supportsim.contract.messages import DeadLetter
from supportsim.settings import ServiceSettings


def topic_config(settings: ServiceSettings, partitions: int) -> TopicConfig:
    """A topic config with the configured retention and replication."""
    return TopicConfig(
        num_partitions=partitions,
        replication_factor=settings.kafka.replication_factor,
        extra_config={
            "retention.ms": str(settings.topic_retention_ms),
            "retention.bytes": str(settings.topic_retention_bytes),
        },
    )


@dataclass(frozen=True)
class Topics:
    """The three topics of the system, as Quix Streams topics of one application.

    `write_dead_letter(record, key)` (set by `streaming.make_app`) writes one dead letter at once.
    """

    chat: Topic
    scored: Topic
    dead_letters: Topic
    write_dead_letter: Callable[[DeadLetter, bytes | None], None] | None = None


def declare_topics(app: Application, settings: ServiceSettings) -> Topics:
    """Declare every topic on `app` (created on the broker when the app starts).

    Values are read as raw bytes so that validation, not deserialization, decides what is bad,
    and bad values reach the dead-letter topic with their reason instead of killing the loop.
    """

    def declare(name: str, partitions: int) -> Topic:
        return app.topic(
            name,
            value_deserializer="bytes",
            key_deserializer="bytes",
            value_serializer="json",
            key_serializer="bytes",
            config=topic_config(settings, partitions),
        )

    return Topics(
        chat=declare(settings.chat_topic, settings.chat_partitions),
        scored=declare(settings.scored_topic, settings.scored_partitions),
        dead_letters=declare(settings.dead_letter_topic, settings.dead_letter_partitions),
    )
