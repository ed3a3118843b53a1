"""Read back what a run left: every record of a topic, the Redis view, the dead letters."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import redis

from supportsim.contract.messages import DeadLetter
from supportsim.kafka.reader import Record, TopicMissing, TopicReader
from supportsim.local.broker import LOCAL_ISOLATION_LEVEL
from supportsim.local.stack import Stack
from supportsim.settings import KafkaSettings, ServiceSettings
from tests.harness.runs import (
    CHECKER,
)


def read_records(
    address: str, topic: str, timeout: float = 60.0, isolation: str = LOCAL_ISOLATION_LEVEL
) -> list[Record]:
    """Every record of `topic` up to its end, in (partition, offset) order; [] if it is missing.

    Read with the project's bounded reader (`supportsim.kafka.reader`: where it ends, and why,
    is in its docstring). The default `isolation` reads as the services of the embedded stack
    do; `read_committed` stops at the first transaction still open, if any. TimeoutError when a
    partition makes no progress for `timeout` seconds short of its end.
    """
    kafka = KafkaSettings(broker_address=address)
    with TopicReader(kafka=kafka, isolation=isolation, purpose=CHECKER) as reader:
        reading = reader.read(topic, stall_timeout=timeout)
        try:
            records = list(reading)
        except TopicMissing:
            return []
    if reading.stalled:
        raise TimeoutError(
            f"{topic}: partitions {reading.stalled} not read to their end (stopped at "
            f"{[reading.stopped[p] for p in reading.stalled]} of "
            f"{[reading.ends[p] for p in reading.stalled]}, {len(records)} records read)"
        )
    return sorted(records, key=lambda r: (r.partition, r.offset))


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
