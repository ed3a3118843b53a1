"""Read back what a run left: every record of a topic, the Redis view, the dead letters."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import redis
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    TopicPartition,
)

from supportsim.contract.messages import (
    DeadLetter,
    new_id,
)
from supportsim.local.broker import LOCAL_ISOLATION_LEVEL
from supportsim.local.stack import Stack
from supportsim.settings import ServiceSettings
from tests.harness.runs import (
    CHECKER,
)


@dataclass(frozen=True)
class Record:
    """One Kafka record as read back."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def read_records(
    address: str, topic: str, timeout: float = 60.0, isolation: str = LOCAL_ISOLATION_LEVEL
) -> list[Record]:
    """Every record of `topic` up to its end, in (partition, offset) order.

    The default `isolation` reads as the services of the embedded stack do; `read_committed`
    reads up to the first transaction still open, if any. Each partition is read until the
    client reports its end (partition EOF): Tansu's ListOffsets answers are not usable as an
    end (it reported 0 on busy `chat` partitions), so watermarks are not used.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": address,
            "group.id": f"{CHECKER}-{new_id()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": isolation,
            # Tansu holds a fetch for this long even when it has data, and a partition that
            # transactions touched holds thousands of commit markers (the dead letters'
            # partition: 3,000 offsets for 44 records); 500 ms each, it would never end
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        info = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if info is None or info.error is not None:
            return []
        pending = set(info.partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in pending])
        records: list[Record] = []
        deadline = time.monotonic() + timeout
        last_error = None
        while pending:
            if time.monotonic() > deadline:
                positions = consumer.position([TopicPartition(topic, p) for p in sorted(pending)])
                raise TimeoutError(
                    f"{topic}: partitions {sorted(pending)} not read to their end (positions "
                    f"{[(p.partition, p.offset) for p in positions]}, {len(records)} records "
                    f"read, last error: {last_error})"
                )
            for message in consumer.consume(1000, 0.5):
                if message.error() is not None:
                    if message.error().code() == KafkaError._PARTITION_EOF:
                        pending.discard(message.partition())
                    else:
                        last_error = message.error()
                    continue
                records.append(
                    Record(message.partition(), message.offset(), message.key(), message.value())
                )
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


@dataclass
class RedisState:
    """What the aggregator wrote under one key prefix."""

    fleet: dict | None
    conversations: dict[str, dict]
    active: set[str]
    ended: set[str]


def read_redis(url: str, prefix: str) -> RedisState:
    """Every aggregate under `prefix`."""
    from supportsim.contract.redis_keys import RedisKeys

    keys = RedisKeys(prefix)
    client = redis.Redis.from_url(url)
    marker = keys.conversation("")
    names = sorted(client.scan_iter(f"{marker}*", count=1000))
    conversations = {}
    for start in range(0, len(names), 500):
        chunk = names[start : start + 500]
        for name, raw in zip(chunk, client.mget(chunk), strict=True):
            if raw is not None:
                conversations[name.decode()[len(marker) :]] = json.loads(raw)
    raw_fleet = client.get(keys.fleet)
    return RedisState(
        fleet=json.loads(raw_fleet) if raw_fleet else None,
        conversations=conversations,
        active={m.decode() for m in client.zrange(keys.active, 0, -1)},
        ended={m.decode() for m in client.zrange(keys.ended, 0, -1)},
    )


@dataclass
class Snapshot:
    """The three topics and Redis, read at one moment."""

    chat: list[Record]
    scored: list[Record]
    dead_letters: list[Record]
    redis: RedisState
    # per topic: records that Kafka's read_committed readers would not reach (behind a transaction
    # left open); the services of the embedded stack read uncommitted
    hidden: dict[str, int] = field(default_factory=dict)


def snapshot(stack: Stack, prefix: str) -> Snapshot:
    """Read the topics (to their current ends) and the Redis aggregates of a running stack."""
    settings = ServiceSettings()
    address = stack.broker.address
    topics = {
        "chat": settings.chat_topic,
        "chat-scored": settings.scored_topic,
        "chat-dead-letters": settings.dead_letter_topic,
    }
    records = {name: read_records(address, topic) for name, topic in topics.items()}
    # what Kafka's read_committed readers would not reach: behind a transaction left open
    hidden = {
        name: len(records[name]) - len(read_records(address, topic, isolation="read_committed"))
        for name, topic in topics.items()
    }
    return Snapshot(
        chat=records["chat"],
        scored=records["chat-scored"],
        dead_letters=records["chat-dead-letters"],
        redis=read_redis(stack.redis.url, prefix),
        hidden={name: count for name, count in hidden.items() if count},
    )


def dead_letters(records: list[Record]) -> list[DeadLetter]:
    """Dead-letter records as models (a record that is not one is reported as such)."""
    out = []
    for record in records:
        try:
            out.append(DeadLetter.model_validate_json(record.value or b""))
        except ValueError as exc:
            out.append(
                DeadLetter(
                    source_topic="?",
                    value=repr(record.value[:200] if record.value else record.value),
                    error=f"unreadable dead letter: {exc}",
                    service="?",
                )
            )
    return out
