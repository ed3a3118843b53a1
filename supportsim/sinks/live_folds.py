"""The live view's folds: pure functions from scored messages to the Redis documents' values.

No I/O here: the aggregator (:mod:`supportsim.sinks.live_view`) keeps what these return in its
state and writes it to Redis; the tests fold messages and compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import orjson

from supportsim.contract.live_view import DEFAULT_BUCKET_MS
from supportsim.contract.protocol import turn_order_problem

SCORE_SCALE = 1_000_000  # scores are summed in millionths: integer sums do not depend on order
MAX_SENTIMENTS = 1000  # per-message sentiments kept per conversation (the latest ones)
ROLES = ("customer", "agent")
OUTCOMES = ("resolved", "unresolved", "gave_up")


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
