"""Live aggregates of the scored chat stream, kept in Kafka-backed state and written to Redis.

Two stages in one Quix Streams application (exactly-once, so state, outputs and offsets commit
together):

The folds are pure functions in :mod:`supportsim.sinks.live_folds`:

1. per conversation (keyed by `conversation_id`, the Kafka key): :func:`fold_message` turns
   each scored message into the conversation's new aggregate and its *contribution* to the fleet;
2. the fleet (every contribution regrouped under the one key ``"fleet"``):
   :func:`fold_contribution` adds a contribution to the fleet aggregate.

Both stages are idempotent as well: a conversation only moves to a later turn, and the fleet
counts each (conversation, turn) once, so the aggregates stay exact under redelivery, a restart
or a broker that re-exposes a fenced transaction. Sums are integers (sentiment scores in
millionths), so the aggregates do not depend on the order the partitions interleave in, and a
replay rewrites byte-identical Redis values.

Sinks write whole values (SET, never INCR) at each checkpoint, before the offsets commit, each
validated and serialised by its model in :mod:`supportsim.contract.live_view` (the one
definition of the layout; the folds work on plain dicts of the same shape); when
Redis is down they signal backpressure, so the application pauses, keeps its place in the group
and retries with a capped exponential backoff, and nothing is lost. A :class:`PipelineReader`
thread beside the application counts the chat and dead-letter topics (how far scoring is behind).
Every key is documented in docs/redis-keys.md.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod
from datetime import timedelta
from typing import Any

import orjson
import redis
from pydantic import Field
from pydantic_settings import SettingsConfigDict
from quixstreams import Application, State
from quixstreams.sinks.base import BatchingSink, SinkBackpressureError, SinkBatch

from supportsim.contract.live_view import (
    Conversation,
    Fleet,
    Pipeline,
    encode,
    written,
    written_series,
)
from supportsim.contract.messages import ChatMessage, DeadLetter, ScoredMessage, now_ms, parse
from supportsim.contract.redis_keys import RedisKeys
from supportsim.kafka.app import make_app
from supportsim.kafka.dead_letters import validated
from supportsim.kafka.topics import Topics
from supportsim.settings import RedisSettings, ServiceSettings
from supportsim.sinks.live_folds import (
    Limits,
    ProtocolViolation,
    Reject,
    Skip,
    dead_letter_time,
    empty_pipeline,
    ended_marker,
    fleet_view,
    fold_chat,
    fold_contribution,
    fold_dead_letter,
    fold_message,
    forget_old_pipeline,
    pipeline_view,
    series_view,
)

logger = logging.getLogger(__name__)

FLEET_KEY = "fleet"
CONVERSATION_KEY = "conversation"

# Redis answers that mean "not now": wait and retry; anything else is a bug worth crashing on.
REDIS_UNAVAILABLE = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError (loading its data set)
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica during failover
    redis.exceptions.TryAgainError,
    redis.exceptions.MasterDownError,
    redis.exceptions.OutOfMemoryError,  # maxmemory reached; expiring keys make room
    OSError,
)


class AggregatorSettings(ServiceSettings, RedisSettings):
    """Settings of the Redis aggregator (environment variables of the same names, upper case)."""

    model_config = SettingsConfigDict(extra="ignore")

    service_name: str = "redis_aggregator"
    # a checkpoint writes Redis: a short interval keeps the live view within a fraction of a second
    commit_interval: float = 0.25
    recent_messages: int = Field(
        50, ge=1, le=1000, description="Messages kept per conversation for the live view."
    )
    conversation_retention_s: int = Field(
        86_400, ge=1, description="Seconds a conversation stays in Redis after its last message."
    )
    series_bucket_s: int = Field(
        10, ge=1, description="Width (s) of a sentiment time-series bucket."
    )
    series_buckets: int = Field(
        360, ge=1, le=100_000, description="Buckets kept in the sentiment time series."
    )
    redis_retry_max_s: float = Field(
        5.0, gt=0, description="Longest pause (s) between retries while Redis is unavailable."
    )

    @property
    def limits(self) -> Limits:
        """The bounds every aggregate respects."""
        return Limits(
            recent_messages=self.recent_messages,
            retention_ms=self.conversation_retention_s * 1000,
            bucket_ms=self.series_bucket_s * 1000,
            buckets=self.series_buckets,
        )


# --------------------------------------------------------------------------- per conversation


def conversation_record(aggregate: dict, value: bytes) -> dict:
    """What the conversation sink gets: the encoded aggregate and its bookkeeping fields.

    Small and flat, so it is cheap to copy between the two branches of the pipeline. The sink
    writes `value` through the :class:`Conversation` model (:func:`conversation_value`).
    """
    return {
        "conversation_id": aggregate["conversation_id"],
        "updated_ms": aggregate["updated_ms"],
        "ended_ms": aggregate["ended_ms"],
        "value": value,
    }


# --------------------------------------------------------------------------- fleet


# --------------------------------------------------------------------------- Redis


def conversation_value(value: bytes) -> bytes:
    """The `conversation:{id}` value for an encoded aggregate, through the model."""
    return encode(written(Conversation, Conversation.model_validate_json(value)))


def fleet_values(fleet: dict, limits: Limits) -> tuple[bytes, bytes]:
    """The `fleet` and `series:sentiment` values for a fleet aggregate, through the models."""
    return (
        encode(written(Fleet, fleet_view(fleet, limits))),
        encode(written_series(series_view(fleet, limits))),
    )


def pipeline_value(pipeline: dict, limits: Limits) -> bytes:
    """The `pipeline` value for the pipeline reader's counts, through the model."""
    return encode(written(Pipeline, pipeline_view(pipeline, limits)))


class RedisSink(BatchingSink):
    """A sink that writes whole values to Redis at each checkpoint, waiting out outages.

    A write that fails because Redis is unavailable raises backpressure: the application drops
    the checkpoint, seeks back to its start, pauses for a capped exponential backoff and then
    processes the same messages again, so nothing is lost and the consumer stays in its group.
    """

    def __init__(self, url: str, keys: RedisKeys, limits: Limits, retry_max_s: float = 5.0) -> None:
        super().__init__(on_client_connect_success=lambda: None)
        self._url = url
        self._client: redis.Redis | None = None
        self._failures = 0
        self._retry_max_s = retry_max_s
        self.keys = keys
        self.limits = limits

    def setup(self) -> None:
        """Create the client; it connects on first use, so a Redis down at start is no crash."""
        self._client = redis.Redis.from_url(
            self._url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10
        )

    @property
    def client(self) -> redis.Redis:
        """The Redis client (after `setup`)."""
        if self._client is None:
            self.setup()
        assert self._client is not None
        return self._client

    def retry_after(self) -> float:
        """Seconds to wait after the current run of failures: 0.5, 1, 2, ... capped."""
        return min(self._retry_max_s, 0.5 * 2 ** (self._failures - 1))

    def write(self, batch: SinkBatch) -> None:
        """Write a batch; on an unavailable Redis, log and ask the application to retry."""
        try:
            self.write_values(batch)
        except REDIS_UNAVAILABLE as exc:
            self._failures += 1
            delay = self.retry_after()
            logger.warning(
                "%s: Redis unavailable (%s: %s); attempt %d failed, retrying in %.1f s "
                "from the last committed offsets, nothing is lost",
                type(self).__name__,
                type(exc).__name__,
                exc,
                self._failures,
                delay,
            )
            raise SinkBackpressureError(retry_after=delay) from exc
        if self._failures:
            logger.info(
                "%s: Redis is back after %d failed attempts", type(self).__name__, self._failures
            )
            self._failures = 0

    @abstractmethod
    def write_values(self, batch: SinkBatch) -> None:
        """Write the batch's values (idempotently: the same batch twice gives the same data)."""


class ConversationSink(RedisSink):
    """Writes `conversation:{id}` values and the active/ended sorted sets.

    Its records are :func:`conversation_record` dicts: the encoded value plus what the sorted
    sets and the expiry need.
    """

    def write_values(self, batch: SinkBatch) -> None:
        """Write the latest value of each conversation in the batch, in one transaction."""
        latest: dict[str, dict] = {}
        for item in batch:
            latest[item.value["conversation_id"]] = item.value
        now = now_ms()
        retention = self.limits.retention_ms
        keys = self.keys
        pipe = self.client.pipeline(transaction=True)
        for conversation_id, record in latest.items():
            key = keys.conversation(conversation_id)
            ended = record["ended_ms"] is not None
            # expiry follows the data, not the clock of this write, so a replay sets the same one
            expire_at = (record["ended_ms"] if ended else record["updated_ms"]) + retention
            if expire_at <= now:
                pipe.delete(key)
                pipe.zrem(keys.active, conversation_id)
                pipe.zrem(keys.ended, conversation_id)
                continue
            pipe.set(key, conversation_value(record["value"]), pxat=expire_at)
            if ended:
                pipe.zrem(keys.active, conversation_id)
                pipe.zadd(keys.ended, {conversation_id: record["ended_ms"]})
            else:
                pipe.zrem(keys.ended, conversation_id)
                pipe.zadd(keys.active, {conversation_id: record["updated_ms"]})
        pipe.zremrangebyscore(keys.ended, "-inf", f"({now - retention}")
        pipe.zremrangebyscore(keys.active, "-inf", f"({now - retention}")
        pipe.execute()


class FleetSink(RedisSink):
    """Writes the `fleet` and `series:sentiment` values."""

    def write_values(self, batch: SinkBatch) -> None:
        """Write the fleet aggregate as it stands after the batch's last contribution."""
        fleet = None
        for item in batch:
            fleet = item.value
        if fleet is None:
            return
        fleet_value, series_value = fleet_values(fleet, self.limits)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.fleet, fleet_value)
        pipe.set(self.keys.series, series_value)
        pipe.execute()


# --------------------------------------------------------------------------- pipeline


def build_aggregator(settings: AggregatorSettings, *, read_pipeline: bool = True) -> Application:
    """The aggregator application: scored messages in, Redis values out (call `.run()`).

    With `read_pipeline`, a :class:`PipelineReader` thread also counts the chat and dead-letter
    topics into the `pipeline` key.
    """
    group = "redis-aggregator"
    app, topics = make_app(
        settings,
        group=group,
        # the checkpoint that writes Redis waits for the poll: after the last message of a burst,
        # a long poll would hold its values back
        consumer_poll_timeout=min(0.1, settings.commit_interval),
    )
    limits = settings.limits
    ttl = timedelta(milliseconds=limits.retention_ms)
    keys = RedisKeys(settings.redis_key_prefix)
    url = settings.redis_url.get_secret_value()

    def per_conversation(
        message: dict, key: bytes | None, _timestamp: int, _headers: Any, state: State
    ) -> dict | None:
        if key is None:
            raise ValueError("message has no Kafka key; the key must be its conversation_id")
        stored = state.get_bytes(CONVERSATION_KEY)
        folded = fold_message(orjson.loads(stored) if stored else None, message, limits)
        if isinstance(folded, Reject):
            raise ProtocolViolation(folded.reason)
        if isinstance(folded, Skip):
            logger.warning("skipped: %s", folded.reason)
            return None
        conversation = folded.conversation
        value = encode(conversation)
        # an ended conversation keeps only a small marker; both expire after the retention
        kept = value if conversation["status"] == "active" else encode(ended_marker(conversation))
        state.set_bytes(CONVERSATION_KEY, kept, ttl=ttl)
        return {
            "conversation": conversation_record(conversation, value),
            "contribution": folded.contribution,
        }

    def per_fleet(contribution: dict, state: State) -> dict | None:
        # each (conversation, turn) counts once, even if a broker re-exposes a fenced transaction
        counted_key = f"turn:{contribution['conversation_id']}"
        counted = state.get(counted_key)
        if counted is not None and contribution["turn"] <= counted:
            logger.warning(
                "skipped: contribution of turn %s of conversation %s already counted",
                contribution["turn"],
                contribution["conversation_id"],
            )
            return None
        fleet = fold_contribution(state.get(FLEET_KEY), contribution, limits)
        state.set(FLEET_KEY, fleet)
        state.set(counted_key, contribution["turn"], ttl=ttl)
        return fleet

    messages = validated(app.dataframe(topics.scored), ScoredMessage, topics, settings.service_name)
    folded = messages.apply(per_conversation, stateful=True, metadata=True).filter(
        lambda r: r is not None
    )
    conversations = folded.apply(lambda r: r["conversation"])
    conversations.sink(ConversationSink(url, keys, limits, settings.redis_retry_max_s))
    contributions = folded.apply(lambda r: r["contribution"])
    fleet = contributions.group_by(lambda _: FLEET_KEY, name=FLEET_KEY)
    fleet.apply(per_fleet, stateful=True).filter(lambda f: f is not None).sink(
        FleetSink(url, keys, limits, settings.redis_retry_max_s)
    )
    if read_pipeline:
        PipelineReader(app, topics, keys, url, limits).start()
    return app


# --------------------------------------------------------------------------- pipeline figures

PIPELINE_WRITE_S = 1.0  # seconds between writes of the `pipeline` key


class PipelineReader:
    """Counts what the bots wrote to `chat` and what went to the dead-letter topic.

    Runs beside the aggregator in its own thread with its own consumer: no consumer group, no
    commits, every partition read from the start after each restart, so the counts follow from
    the topics alone and every replica writes the same `pipeline` value. Kept out of the
    exactly-once application on purpose: a topic read there joins its partition buffers, and
    a Redis outage (backpressure) then drops buffered messages it never processed.
    """

    def __init__(self, app: Application, topics: Topics, keys: RedisKeys, url: str, limits: Limits):
        self._app = app
        self._chat = topics.chat.name
        self._dead = topics.dead_letters.name
        self._keys = keys
        self._url = url
        self._limits = limits
        self.pipeline = empty_pipeline()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start reading in a daemon thread (it ends with the process, or on `stop`)."""
        self._thread = threading.Thread(target=self._run, name="pipeline-reader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop."""
        self._stop.set()

    def fold(self, topic: str, value: bytes | None, record_ms: int) -> None:
        """Count one record of either topic; bad chat values are the scorer's to report."""
        if topic == self._dead:
            fold_dead_letter(self.pipeline, dead_letter_time(value, record_ms), self._limits)
            return
        parsed = parse(ChatMessage, value, service="redis_aggregator", source_topic=topic)
        if not isinstance(parsed, DeadLetter):
            fold_chat(self.pipeline, parsed.model_dump(), self._limits)

    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        client = redis.Redis.from_url(self._url, socket_timeout=5, socket_connect_timeout=2)
        while not self._stop.is_set():
            try:
                with self._app.get_consumer(auto_commit_enable=False) as consumer:
                    partitions = []
                    for topic in (self._chat, self._dead):
                        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
                        partitions += [
                            TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions
                        ]
                    consumer.assign(partitions)
                    self.pipeline = empty_pipeline()
                    last_write = 0.0
                    while not self._stop.is_set():
                        for message in consumer.consume(num_messages=1000, timeout=0.5):
                            if message.error() is None:
                                self.fold(message.topic(), message.value(), message.timestamp()[1])
                        if time.monotonic() - last_write >= PIPELINE_WRITE_S:
                            forget_old_pipeline(self.pipeline, self._limits)
                            value = pipeline_value(self.pipeline, self._limits)
                            try:
                                client.set(self._keys.pipeline, value)
                                last_write = time.monotonic()
                            except REDIS_UNAVAILABLE as exc:
                                logger.warning("pipeline figures not written: %s", exc)
                                last_write = time.monotonic()
            except Exception:  # a reader problem must never stop the aggregator
                logger.exception("pipeline reader failed; starting again in 5 s")
                self._stop.wait(5)
