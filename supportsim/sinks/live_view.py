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
import math
import threading
import time
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

from supportsim.contract.live_view import (
    DEFAULT_BUCKET_MS,
    Conversation,
    Fleet,
    Pipeline,
    encode,
    written,
    written_series,
)
from supportsim.contract.messages import ChatMessage, DeadLetter, ScoredMessage, now_ms, parse
from supportsim.contract.protocol import turn_order_problem
from supportsim.contract.redis_keys import RedisKeys
from supportsim.kafka.app import make_app
from supportsim.kafka.dead_letters import validated
from supportsim.kafka.topics import Topics
from supportsim.settings import RedisSettings, ServiceSettings

logger = logging.getLogger(__name__)

SCORE_SCALE = 1_000_000  # scores are summed in millionths: integer sums do not depend on order
MAX_SENTIMENTS = 1000  # per-message sentiments kept per conversation (the latest ones)
FLEET_KEY = "fleet"
CONVERSATION_KEY = "conversation"
ROLES = ("customer", "agent")
OUTCOMES = ("resolved", "unresolved", "gave_up")

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


@dataclass(frozen=True)
class Limits:
    """Bounds of the aggregates: how much history each keeps, and for how long."""

    recent_messages: int = 50
    retention_ms: int = 86_400_000
    bucket_ms: int = DEFAULT_BUCKET_MS
    buckets: int = 360
    sentiments: int = MAX_SENTIMENTS
    # turns of an open conversation that may be missing (dead-lettered upstream) before a turn
    max_turn_gap: int = 10


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
    - a first message that is not turn 0 (an unknown conversation), a turn that leaves a gap
      of more than `limits.max_turn_gap` turns, and a turn after the final one are rejected
      (dead letters, with the reason);
    - a smaller gap (turns dead-lettered upstream) is accepted and counted in `missing_turns`.

    The aggregate has the shape of the `conversation:{id}` value in Redis (the
    :class:`~supportsim.contract.live_view.Conversation` model, docs/redis-keys.md), so state
    keeps it in the same encoding.
    """
    turn = message["turn"]
    sentiment = message["sentiment"]
    cid, mid = message["conversation_id"], message["message_id"]
    where = f"message {mid} of conversation {cid}"
    problem = turn_order_problem(
        turn,
        None if aggregate is None else aggregate["last_turn"],
        aggregate is not None and aggregate["status"] == "ended",
        max_gap=limits.max_turn_gap,
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
    if "roles" not in aggregate:  # state from before per-role totals: rebuild from its sentiments
        aggregate["roles"] = role_totals(aggregate["sentiments"])
    aggregate.setdefault("card", None)
    aggregate.setdefault("outcome", None)
    aggregate.setdefault("remedy", None)
    aggregate.setdefault("missing_turns", 0)
    if not started:
        aggregate["missing_turns"] += turn - aggregate["last_turn"] - 1
    points = score_micro(sentiment["score"])
    role = message["role"]
    _add_role_score(aggregate["roles"], role, sentiment["score"])
    card = message.get("card")
    if isinstance(card, dict):
        aggregate["card"] = card
    remedy = message.get("remedy") if role == "agent" else None
    if isinstance(remedy, str) and remedy:
        aggregate["remedy"] = remedy
    else:
        remedy = None
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
    recent = {
        "message_id": message["message_id"],
        "turn": turn,
        "role": message["role"],
        "text": message["text"],
        "label": sentiment["label"],
        "score": sentiment["score"],
        "timestamp_ms": message["timestamp_ms"],
    }
    if remedy is not None:
        recent["remedy"] = remedy
    aggregate["recent"].append(recent)
    del aggregate["recent"][: -limits.recent_messages]
    ended = bool(message.get("final"))
    aggregate["status"] = "ended" if ended else "active"
    if ended:
        aggregate["end_reason"] = message.get("end_reason")
        aggregate["ended_ms"] = message["timestamp_ms"]
        outcome = message.get("outcome")
        aggregate["outcome"] = outcome if isinstance(outcome, str) and outcome else None
    roles = aggregate["roles"]
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
        "role": role,
        "customer_last_micro": _last_micro(roles, "customer"),
        "agent_last_micro": _last_micro(roles, "agent"),
    }
    return Folded(aggregate, contribution)


def role_totals(sentiments: list[dict]) -> dict:
    """Per-role sentiment totals (`roles` of a conversation) from its per-message sentiments."""
    roles: dict = {}
    for point in sentiments:
        if point.get("role") in ROLES:
            _add_role_score(roles, point["role"], point["score"])
    return roles


def _add_role_score(roles: dict, role: str, score: float) -> None:
    totals = roles.setdefault(
        role, {"messages": 0, "sentiment_sum_micro": 0, "sentiment_first": score}
    )
    totals["messages"] += 1
    totals["sentiment_sum_micro"] += score_micro(score)
    totals["sentiment_avg"] = mean(totals["sentiment_sum_micro"], totals["messages"], SCORE_SCALE)
    totals["sentiment_last"] = score


def _last_micro(roles: dict, role: str) -> int | None:
    totals = roles.get(role)
    return None if totals is None else score_micro(totals["sentiment_last"])


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

# a series bucket in state: counts by message time, padded when read from older state
SERIES_FIELDS = (
    "messages",
    "score_micro",
    "completion_tokens",
    "customer_messages",
    "customer_score_micro",
)


def empty_fleet() -> dict:
    """The fleet aggregate before any message."""
    fleet = {
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
        # conversation_id -> [score_micro, messages, updated_ms, mood, product,
        #                     customer_last_micro, agent_last_micro]
        "active": {},
        "series": {},  # str(bucket_ms) -> counts in the order of SERIES_FIELDS
        "newest_ms": None,
    }
    _upgrade(fleet)
    return fleet


def _upgrade(fleet: dict) -> dict:
    """Add what a fleet aggregate from older state lacks (per-role totals)."""
    fleet.setdefault("roles", {role: [0, 0] for role in ROLES})  # role -> [messages, score_micro]
    return fleet


def fold_contribution(fleet: dict | None, contribution: dict, limits: Limits) -> dict:
    """Add one conversation's contribution (from :func:`fold_message`) to the fleet aggregate.

    Updates `fleet` in place (it is rebuilt from state for every message) and returns it. A
    conversation silent for longer than the retention leaves the active set and counts as
    abandoned until it speaks again.
    """
    fleet = _upgrade(fleet) if fleet is not None else empty_fleet()
    conversation_id = contribution["conversation_id"]
    points = contribution["score_micro"]
    timestamp = contribution["timestamp_ms"]
    customer = contribution.get("role") == "customer"
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
    if contribution.get("role") in ROLES:
        totals = fleet["roles"].setdefault(contribution["role"], [0, 0])
        totals[0] += 1
        totals[1] += points
    for group in groups:
        group["messages"] += 1
        group["score_micro"] += points
        if customer:
            group["customer_messages"] = group.get("customer_messages", 0) + 1
            group["customer_score_micro"] = group.get("customer_score_micro", 0) + points
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
            contribution.get("customer_last_micro"),
            contribution.get("agent_last_micro"),
        ]
    previous_newest = _series_newest(fleet)
    previous = fleet["newest_ms"]
    fleet["newest_ms"] = timestamp if previous is None else max(previous, timestamp)
    counts = _bucket(fleet, timestamp, limits)
    if counts is not None:
        counts[0] += 1
        counts[1] += points
        counts[2] += contribution["completion_tokens"]
        if customer:
            counts[3] += 1
            counts[4] += points
    _after_time_moved(fleet, previous_newest, limits)
    return fleet


def _empty_group() -> dict:
    return {"conversations": 0, "messages": 0, "score_micro": 0}


def _series_newest(fleet: dict) -> int | None:
    """The series window ends at the newest message."""
    return fleet["newest_ms"]


def _bucket(fleet: dict, timestamp: int, limits: Limits) -> list[int] | None:
    """The counts of the bucket holding `timestamp`; None when it is older than the window."""
    newest = _series_newest(fleet)
    bucket = timestamp - timestamp % limits.bucket_ms
    if newest is not None and bucket <= _oldest_dropped_bucket(newest, limits):
        return None
    counts = fleet["series"].setdefault(str(bucket), [0] * len(SERIES_FIELDS))
    counts.extend([0] * (len(SERIES_FIELDS) - len(counts)))
    return counts


def _after_time_moved(fleet: dict, previous_newest: int | None, limits: Limits) -> None:
    newest = _series_newest(fleet)
    if (
        previous_newest is not None
        and newest is not None
        and newest // limits.bucket_ms != previous_newest // limits.bucket_ms
    ):
        _forget_old(fleet, limits)


def _oldest_dropped_bucket(newest_ms: int, limits: Limits) -> int:
    newest_bucket = newest_ms - newest_ms % limits.bucket_ms
    return newest_bucket - limits.buckets * limits.bucket_ms


def _forget_old(fleet: dict, limits: Limits) -> None:
    """Drop series buckets past the window and conversations silent past the retention."""
    cutoff = _oldest_dropped_bucket(_series_newest(fleet), limits)
    for bucket in [b for b in fleet["series"] if int(b) <= cutoff]:
        del fleet["series"][bucket]
    if fleet["newest_ms"] is None:
        return
    silent_since = fleet["newest_ms"] - limits.retention_ms
    for conversation_id, entry in list(fleet["active"].items()):
        if entry[2] <= silent_since:
            del fleet["active"][conversation_id]
            fleet["abandoned"] += 1


def fleet_view(fleet: dict, limits: Limits) -> dict:
    """The `fleet` value in Redis for a fleet aggregate (the :class:`Fleet` model's fields)."""
    fleet = _upgrade(fleet)
    count = fleet["messages"]
    active = fleet["active"]
    averages = [entry[0] / entry[1] for entry in active.values() if entry[1]]
    active_by: dict[str, dict[str, int]] = {"mood": {}, "product": {}}
    latest: dict[str, list[int]] = {role: [] for role in ROLES}
    for entry in active.values():
        mood, product = entry[3], entry[4]
        active_by["mood"][mood] = active_by["mood"].get(mood, 0) + 1
        active_by["product"][product] = active_by["product"].get(product, 0) + 1
        for role, value in zip(ROLES, entry[5:7], strict=False):
            if value is not None:
                latest[role].append(value)

    def groups(name: str) -> dict:
        return {
            value: {
                "conversations": group["conversations"],
                "active": active_by[name].get(value, 0),
                "messages": group["messages"],
                "sentiment_avg": mean(group["score_micro"], group["messages"], SCORE_SCALE),
                "customer_messages": group.get("customer_messages", 0),
                "customer_sentiment_avg": mean(
                    group.get("customer_score_micro", 0),
                    group.get("customer_messages", 0),
                    SCORE_SCALE,
                ),
            }
            for value, group in fleet[f"by_{name}"].items()
        }

    roles = {}
    for role in ROLES:
        messages, points = fleet["roles"].get(role, [0, 0])
        roles[role] = {
            "messages": messages,
            "sentiment_avg": mean(points, messages, SCORE_SCALE),
            # latest score of this role in each active conversation; integer sum, order-free
            "sentiment_now": mean(sum(latest[role]), len(latest[role]), SCORE_SCALE),
            "sentiment_now_conversations": len(latest[role]),
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
        "roles": roles,
        "updated_ms": fleet["newest_ms"],
        "series_bucket_ms": limits.bucket_ms,
    }


def series_view(fleet: dict, limits: Limits) -> list[dict]:
    """The `series:sentiment` value in Redis: buckets with messages, oldest first (each a
    :class:`~supportsim.contract.live_view.SeriesPoint`)."""
    newest = _series_newest(fleet)
    if newest is None:
        return []
    cutoff = _oldest_dropped_bucket(newest, limits)
    view = []
    for bucket, stored in sorted(fleet["series"].items(), key=lambda item: int(item[0])):
        if int(bucket) <= cutoff:
            continue
        padded = [*stored, *[0] * (len(SERIES_FIELDS) - len(stored))]
        counts = dict(zip(SERIES_FIELDS, padded, strict=True))
        messages, customers = counts["messages"], counts["customer_messages"]
        view.append(
            {
                "bucket_ms": int(bucket),
                "messages": messages,
                "sentiment_avg": mean(counts["score_micro"], messages, SCORE_SCALE),
                "completion_tokens": counts["completion_tokens"],
                "customer_messages": customers,
                "customer_sentiment_avg": mean(
                    counts["customer_score_micro"], customers, SCORE_SCALE
                ),
                "agent_sentiment_avg": mean(
                    counts["score_micro"] - counts["customer_score_micro"],
                    messages - customers,
                    SCORE_SCALE,
                ),
            }
        )
    return view


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


def empty_pipeline() -> dict:
    """What the pipeline reader keeps: chat and dead-letter counts, per bucket and in total."""
    return {
        "chat_messages": 0,
        "chat_newest_ms": None,
        "dead_letters": 0,
        "dead_letter_newest_ms": None,
        "turns": {},  # conversation_id -> [last turn, ended] of the chat side
        "series": {},  # str(bucket_ms) -> [chat messages, chat completion tokens, dead letters]
    }


def fold_chat(pipeline: dict, message: dict, limits: Limits) -> bool:
    """Count one valid chat message (a `ChatMessage` as a dict) once per (conversation, turn).

    The same turn-order rules as the scored side, so `chat_messages - messages` (fleet) is
    how many chat messages are not scored or not aggregated yet. True when counted.
    """
    cid, turn = message["conversation_id"], message["turn"]
    last, ended = pipeline["turns"].get(cid, (None, False))
    if turn_order_problem(turn, last, ended, max_gap=limits.max_turn_gap) or (
        last is not None and turn <= last
    ):
        return False
    pipeline["turns"][cid] = [turn, bool(message.get("final"))]
    timestamp = message["timestamp_ms"]
    pipeline["chat_messages"] += 1
    newest = pipeline["chat_newest_ms"]
    pipeline["chat_newest_ms"] = timestamp if newest is None else max(newest, timestamp)
    counts = _pipeline_bucket(pipeline, timestamp, limits)
    if counts is not None:
        counts[0] += 1
        counts[1] += message["completion_tokens"]
    return True


def fold_dead_letter(pipeline: dict, timestamp_ms: int, limits: Limits) -> None:
    """Count one record of the dead-letter topic at its time."""
    pipeline["dead_letters"] += 1
    newest = pipeline["dead_letter_newest_ms"]
    pipeline["dead_letter_newest_ms"] = (
        timestamp_ms if newest is None else max(newest, timestamp_ms)
    )
    counts = _pipeline_bucket(pipeline, timestamp_ms, limits)
    if counts is not None:
        counts[2] += 1


def _pipeline_bucket(pipeline: dict, timestamp: int, limits: Limits) -> list[int] | None:
    times = [t for t in (pipeline["chat_newest_ms"], pipeline["dead_letter_newest_ms"]) if t]
    cutoff = _oldest_dropped_bucket(max(times), limits) if times else None
    bucket = timestamp - timestamp % limits.bucket_ms
    if cutoff is not None and bucket <= cutoff:
        return None
    return pipeline["series"].setdefault(str(bucket), [0, 0, 0])


def forget_old_pipeline(pipeline: dict, limits: Limits) -> None:
    """Drop buckets past the series window and conversations silent past the retention."""
    times = [t for t in (pipeline["chat_newest_ms"], pipeline["dead_letter_newest_ms"]) if t]
    if not times:
        return
    cutoff = _oldest_dropped_bucket(max(times), limits)
    for bucket in [b for b in pipeline["series"] if int(b) <= cutoff]:
        del pipeline["series"][bucket]


def pipeline_view(pipeline: dict, limits: Limits) -> dict:
    """The `pipeline` value in Redis (the :class:`Pipeline` model's fields)."""
    times = [t for t in (pipeline["chat_newest_ms"], pipeline["dead_letter_newest_ms"]) if t]
    cutoff = _oldest_dropped_bucket(max(times), limits) if times else None
    return {
        "chat_messages": pipeline["chat_messages"],
        "chat_newest_ms": pipeline["chat_newest_ms"],
        "dead_letters": pipeline["dead_letters"],
        "dead_letter_newest_ms": pipeline["dead_letter_newest_ms"],
        "series": [
            {
                "bucket_ms": int(bucket),
                "chat_messages": chat,
                "chat_completion_tokens": tokens,
                "dead_letters": dead,
            }
            for bucket, (chat, tokens, dead) in sorted(
                pipeline["series"].items(), key=lambda item: int(item[0])
            )
            if cutoff is None or int(bucket) > cutoff
        ],
        "series_bucket_ms": limits.bucket_ms,
    }


def dead_letter_time(value: bytes | None, record_ms: int) -> int:
    """A dead letter's `timestamp_ms`, else the Kafka record's time."""
    try:
        record = orjson.loads(value) if value else None
    except orjson.JSONDecodeError:
        record = None
    when = record.get("timestamp_ms") if isinstance(record, dict) else None
    if isinstance(when, bool) or not isinstance(when, int) or when <= 0:
        return record_ms
    return when


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
