"""Live aggregates of the scored chat stream, kept in Kafka-backed state and written to Redis.

Two stages in one Quix Streams application (exactly-once, so state, outputs and offsets commit
together):

1. per conversation (keyed by `conversation_id`, the Kafka key): :func:`fold_message` turns
   each scored message into the conversation's new aggregate and its *contribution* to the fleet;
2. the fleet (every contribution regrouped under the one key ``"fleet"``):
   :func:`fold_contribution` adds a contribution to the fleet aggregate.

Both stages are idempotent as well: a conversation only moves to a later turn, and the fleet
counts each (conversation, turn) once, so the aggregates stay exact under redelivery, a restart
or a broker that re-exposes a fenced transaction. Sums are integers (sentiment scores in
millionths), so the aggregates do not depend on the order the partitions interleave in, and a
replay rewrites byte-identical Redis values.

Sinks write whole values (SET, never INCR) at each checkpoint, before the offsets commit; when
Redis is down they signal backpressure, so the application pauses, keeps its place in the group
and retries with a capped exponential backoff, and nothing is lost. Every key is documented in
docs/redis-keys.md.
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

import orjson
import redis
from pydantic import Field
from pydantic_settings import SettingsConfigDict
from quixstreams import Application, State
from quixstreams.sinks.base import BatchingSink, SinkBackpressureError, SinkBatch

from supportsim.bots.conversation import turn_order_problem
from supportsim.messages import ScoredMessage, now_ms
from supportsim.redis_keys import RedisKeys
from supportsim.settings import RedisSettings, ServiceSettings
from supportsim.streaming import make_app, validated

logger = logging.getLogger(__name__)

SCORE_SCALE = 1_000_000  # scores are summed in millionths: integer sums do not depend on order
MAX_SENTIMENTS = 1000  # per-message sentiments kept per conversation (the latest ones)
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
    recent_messages: int = Field(50, ge=1, le=1000)
    conversation_retention_s: int = Field(86_400, ge=1)
    series_bucket_s: int = Field(10, ge=1)
    series_buckets: int = Field(360, ge=1, le=100_000)
    redis_retry_max_s: float = Field(5.0, gt=0)

    @property
    def limits(self) -> Limits:
        """The bounds every aggregate respects."""
        return Limits(
            recent_messages=self.recent_messages,
            retention_ms=self.conversation_retention_s * 1000,
            bucket_ms=self.series_bucket_s * 1000,
            buckets=self.series_buckets,
        )


@dataclass(frozen=True)
class Limits:
    """Bounds of the aggregates: how much history each keeps, and for how long."""

    recent_messages: int = 50
    retention_ms: int = 86_400_000
    bucket_ms: int = 10_000
    buckets: int = 360
    sentiments: int = MAX_SENTIMENTS


# --------------------------------------------------------------------------- per conversation


class Folded(NamedTuple):
    """A message folded into its conversation: the new aggregate and the fleet contribution."""

    conversation: dict
    contribution: dict


class Skip(NamedTuple):
    """A message that changes nothing (a producer duplicate, an older turn), and why."""

    reason: str


class Reject(NamedTuple):
    """A well-formed message that breaks the conversation protocol: it goes to dead letters."""

    reason: str


class ProtocolViolation(ValueError):
    """Raised for a rejected message, so the application routes it to the dead-letter topic."""


def score_micro(score: float) -> int:
    """A sentiment score in integer millionths."""
    return round(score * SCORE_SCALE)


def mean(total: float, count: int, scale: int = 1, digits: int = 6) -> float | None:
    """`total / count / scale`, rounded; None when there is nothing to average."""
    if count <= 0:
        return None
    return round(total / count / scale, digits)


def fold_message(aggregate: dict | None, message: dict, limits: Limits) -> Folded | Skip | Reject:
    """Fold one scored message (a `ScoredMessage` as a dict) into its conversation aggregate.

    `aggregate` is the conversation's previous aggregate (None for a new conversation); it is
    updated in place (state hands out a fresh copy for every message) and returned in `Folded`,
    or left untouched otherwise. Turns only move forward, one at a time, as the bots write them:

    - a turn not after the last one (a producer duplicate, a late older turn) is skipped;
    - a first message that is not turn 0 (an unknown conversation), a turn that leaves a gap,
      and a turn after the final one are rejected (dead letters, with the reason).

    The aggregate has the shape of the `conversation:{id}` value in Redis (docs/redis-keys.md),
    so one encoding serves both state and Redis.
    """
    turn = message["turn"]
    sentiment = message["sentiment"]
    cid, mid = message["conversation_id"], message["message_id"]
    where = f"message {mid} of conversation {cid}"
    problem = turn_order_problem(
        turn,
        None if aggregate is None else aggregate["last_turn"],
        aggregate is not None and aggregate["status"] == "ended",
    )
    if problem is not None:
        return Reject(f"{problem} ({where})")
    if aggregate is not None and turn <= aggregate["last_turn"]:
        seen = any(m["message_id"] == mid for m in aggregate["recent"])
        kind = "duplicate message" if seen else "older turn"
        state = "ended" if aggregate["status"] == "ended" else "already"
        return Skip(
            f"{kind}: turn {turn} ({where}), {state} at turn {aggregate['last_turn']}; ignored"
        )
    started = aggregate is None
    if aggregate is None:
        aggregate = {
            "conversation_id": message["conversation_id"],
            "messages": 0,
            "sentiment_sum_micro": 0,
            "latency_ms_total": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "sentiments": [],
            "recent": [],
            "models": {},
            "started_ms": message["timestamp_ms"],
            "ended_ms": None,
            "end_reason": None,
        }
    points = score_micro(sentiment["score"])
    count = aggregate["messages"] + 1
    aggregate["customer"] = message["customer"]
    aggregate["agent"] = message["agent"]
    aggregate["model"] = message["model"]
    aggregate["models"][message["role"]] = message["model"]
    aggregate["messages"] = count
    aggregate["last_turn"] = turn
    aggregate["sentiment_sum_micro"] += points
    aggregate["sentiment_avg"] = mean(aggregate["sentiment_sum_micro"], count, SCORE_SCALE)
    aggregate["sentiment_last"] = sentiment["score"]
    aggregate["latency_ms_total"] += message["latency_ms"]
    aggregate["latency_ms_avg"] = mean(aggregate["latency_ms_total"], count)
    aggregate["prompt_tokens"] += message["prompt_tokens"]
    aggregate["completion_tokens"] += message["completion_tokens"]
    aggregate["updated_ms"] = message["timestamp_ms"]
    aggregate["sentiments"].append(
        {
            "turn": turn,
            "role": message["role"],
            "label": sentiment["label"],
            "score": sentiment["score"],
        }
    )
    del aggregate["sentiments"][: -limits.sentiments]
    aggregate["recent"].append(
        {
            "message_id": message["message_id"],
            "turn": turn,
            "role": message["role"],
            "text": message["text"],
            "label": sentiment["label"],
            "score": sentiment["score"],
            "timestamp_ms": message["timestamp_ms"],
        }
    )
    del aggregate["recent"][: -limits.recent_messages]
    ended = bool(message.get("final"))
    aggregate["status"] = "ended" if ended else "active"
    if ended:
        aggregate["end_reason"] = message.get("end_reason")
        aggregate["ended_ms"] = message["timestamp_ms"]
    contribution = {
        "conversation_id": message["conversation_id"],
        "mood": message["customer"]["mood"],
        "product": message["customer"]["product"],
        "started": started,
        "ended": ended,
        "end_reason": aggregate["end_reason"],
        "score_micro": points,
        "prompt_tokens": message["prompt_tokens"],
        "completion_tokens": message["completion_tokens"],
        "latency_ms": message["latency_ms"],
        "turn": turn,
        "timestamp_ms": message["timestamp_ms"],
        "conversation_score_micro": aggregate["sentiment_sum_micro"],
        "conversation_messages": count,
    }
    return Folded(aggregate, contribution)


def ended_marker(aggregate: dict) -> dict:
    """What state keeps of an ended conversation: enough to ignore anything that comes later."""
    return {
        "conversation_id": aggregate["conversation_id"],
        "status": "ended",
        "last_turn": aggregate["last_turn"],
        "ended_ms": aggregate["ended_ms"],
        "recent": [],
    }


def conversation_record(aggregate: dict, value: bytes) -> dict:
    """What the conversation sink gets: the encoded Redis value and its bookkeeping fields.

    Small and flat, so it is cheap to copy between the two branches of the pipeline.
    """
    return {
        "conversation_id": aggregate["conversation_id"],
        "updated_ms": aggregate["updated_ms"],
        "ended_ms": aggregate["ended_ms"],
        "value": value,
    }


# --------------------------------------------------------------------------- fleet


def empty_fleet() -> dict:
    """The fleet aggregate before any message."""
    return {
        "started": 0,
        "ended": 0,
        "abandoned": 0,
        "messages": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "latency_ms_total": 0,
        "score_micro": 0,
        "end_reasons": {},
        "by_mood": {},
        "by_product": {},
        # conversation_id -> [score_micro, messages, updated_ms, mood, product]
        "active": {},
        "series": {},  # str(bucket_ms) -> [messages, score_micro, completion_tokens]
        "newest_ms": None,
    }


def fold_contribution(fleet: dict | None, contribution: dict, limits: Limits) -> dict:
    """Add one conversation's contribution (from :func:`fold_message`) to the fleet aggregate.

    Updates `fleet` in place (it is rebuilt from state for every message) and returns it. A
    conversation silent for longer than the retention leaves the active set and counts as
    abandoned until it speaks again.
    """
    fleet = fleet if fleet is not None else empty_fleet()
    conversation_id = contribution["conversation_id"]
    points = contribution["score_micro"]
    timestamp = contribution["timestamp_ms"]
    groups = (
        fleet["by_mood"].setdefault(contribution["mood"], _empty_group()),
        fleet["by_product"].setdefault(contribution["product"], _empty_group()),
    )
    if contribution["started"]:
        fleet["started"] += 1
        for group in groups:
            group["conversations"] += 1
    elif conversation_id not in fleet["active"] and fleet["abandoned"] > 0:
        fleet["abandoned"] -= 1  # an abandoned conversation spoke again
    fleet["messages"] += 1
    fleet["score_micro"] += points
    fleet["prompt_tokens"] += contribution["prompt_tokens"]
    fleet["completion_tokens"] += contribution["completion_tokens"]
    fleet["latency_ms_total"] += contribution["latency_ms"]
    for group in groups:
        group["messages"] += 1
        group["score_micro"] += points
    if contribution["ended"]:
        fleet["ended"] += 1
        reason = contribution["end_reason"] or "unknown"
        fleet["end_reasons"][reason] = fleet["end_reasons"].get(reason, 0) + 1
        fleet["active"].pop(conversation_id, None)
    else:
        fleet["active"][conversation_id] = [
            contribution["conversation_score_micro"],
            contribution["conversation_messages"],
            timestamp,
            contribution["mood"],
            contribution["product"],
        ]
    previous = fleet["newest_ms"]
    newest = timestamp if previous is None else max(previous, timestamp)
    new_bucket = previous is not None and newest // limits.bucket_ms != previous // limits.bucket_ms
    fleet["newest_ms"] = newest
    bucket = timestamp - timestamp % limits.bucket_ms
    if bucket > _oldest_dropped_bucket(newest, limits):
        counts = fleet["series"].setdefault(str(bucket), [0, 0, 0])
        counts[0] += 1
        counts[1] += points
        counts[2] += contribution["completion_tokens"]
    if new_bucket:
        _forget_old(fleet, limits)
    return fleet


def _empty_group() -> dict:
    return {"conversations": 0, "messages": 0, "score_micro": 0}


def _oldest_dropped_bucket(newest_ms: int, limits: Limits) -> int:
    newest_bucket = newest_ms - newest_ms % limits.bucket_ms
    return newest_bucket - limits.buckets * limits.bucket_ms


def _forget_old(fleet: dict, limits: Limits) -> None:
    """Drop series buckets past the window and conversations silent past the retention."""
    cutoff = _oldest_dropped_bucket(fleet["newest_ms"], limits)
    for bucket in [b for b in fleet["series"] if int(b) <= cutoff]:
        del fleet["series"][bucket]
    silent_since = fleet["newest_ms"] - limits.retention_ms
    for conversation_id, (_, _, updated_ms, _, _) in list(fleet["active"].items()):
        if updated_ms <= silent_since:
            del fleet["active"][conversation_id]
            fleet["abandoned"] += 1


def fleet_view(fleet: dict) -> dict:
    """The `fleet` value in Redis for a fleet aggregate."""
    count = fleet["messages"]
    active = fleet["active"]
    averages = [points / messages for points, messages, *_ in active.values() if messages]
    active_by: dict[str, dict[str, int]] = {"mood": {}, "product": {}}
    for *_, mood, product in active.values():
        active_by["mood"][mood] = active_by["mood"].get(mood, 0) + 1
        active_by["product"][product] = active_by["product"].get(product, 0) + 1

    def groups(name: str) -> dict:
        return {
            value: {
                "conversations": group["conversations"],
                "active": active_by[name].get(value, 0),
                "messages": group["messages"],
                "sentiment_avg": mean(group["score_micro"], group["messages"], SCORE_SCALE),
            }
            for value, group in fleet[f"by_{name}"].items()
        }

    return {
        "active": len(active),
        "ended": fleet["ended"],
        "started": fleet["started"],
        "abandoned": fleet["abandoned"],
        "messages": count,
        "prompt_tokens": fleet["prompt_tokens"],
        "completion_tokens": fleet["completion_tokens"],
        # fsum is exact, so the mean does not depend on the order of the active set
        "sentiment_avg_active": mean(math.fsum(averages), len(averages), SCORE_SCALE),
        "sentiment_avg": mean(fleet["score_micro"], count, SCORE_SCALE),
        "latency_ms_avg": mean(fleet["latency_ms_total"], count),
        "tokens_per_message": mean(fleet["prompt_tokens"] + fleet["completion_tokens"], count),
        "completion_tokens_per_message": mean(fleet["completion_tokens"], count),
        "end_reasons": fleet["end_reasons"],
        "by_mood": groups("mood"),
        "by_product": groups("product"),
        "updated_ms": fleet["newest_ms"],
    }


def series_view(fleet: dict, limits: Limits) -> list[dict]:
    """The `series:sentiment` value in Redis: buckets with messages, oldest first."""
    if fleet["newest_ms"] is None:
        return []
    cutoff = _oldest_dropped_bucket(fleet["newest_ms"], limits)
    return [
        {
            "bucket_ms": int(bucket),
            "messages": messages,
            "sentiment_avg": mean(points, messages, SCORE_SCALE),
            "completion_tokens": tokens,
        }
        for bucket, (messages, points, tokens) in sorted(
            fleet["series"].items(), key=lambda item: int(item[0])
        )
        if int(bucket) > cutoff
    ]


# --------------------------------------------------------------------------- Redis


def encode(value: Any) -> bytes:
    """The JSON written to Redis (UTF-8): sorted keys, so equal values are equal bytes."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


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
            pipe.set(key, record["value"], pxat=expire_at)
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
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.fleet, encode(fleet_view(fleet)))
        pipe.set(self.keys.series, encode(series_view(fleet, self.limits)))
        pipe.execute()


# --------------------------------------------------------------------------- pipeline


def build_aggregator(settings: AggregatorSettings) -> Application:
    """The aggregator application: scored messages in, Redis values out (call `.run()`)."""
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
    return app
