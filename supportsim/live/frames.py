"""Dashboard rows and frames from the Redis documents, tolerant of missing or odd values."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
import pandas as pd


def parse_json(raw: str | bytes | None) -> Any:
    """Decode a JSON value; None when missing or malformed."""
    if raw is None:
        return None
    try:
        return orjson.loads(raw)  # a few times faster than json on a thousand documents
    except (ValueError, TypeError):
        return None


def as_number(value: Any) -> float | None:
    """A finite float, or None for anything else (bools, strings, NaN, missing)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def as_int(value: Any, default: int = 0) -> int:
    """An int from a number, else `default`."""
    number = as_number(value)
    return int(number) if number is not None else default


def as_text(value: Any, default: str = "") -> str:
    """A string from a scalar, else `default` (never a dict or list repr)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return default


def as_dict(value: Any) -> dict[str, Any]:
    """The value when it is a dict, else an empty dict."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    """The value when it is a list, else an empty list."""
    return value if isinstance(value, list) else []


STATUSES = ("active", "ended")


TREND_POINTS = 40  # sentiment points kept per conversation for the table's sparkline


CONVERSATION_COLUMNS = [
    "conversation_id",
    "status",
    "customer",
    "mood",
    "product",
    "agent",
    "model",
    "turns",
    "customer_first",
    "customer_now",
    "agent_now",
    "sentiment_avg",
    "sentiment_last",
    "sentiment_trend",
    "end_reason",
    "outcome",
    "wants",
    "started",
    "updated",
    "ended",
    "duration_s",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms_avg",
]


SERIES_COLUMNS = [
    "time",
    "bucket_ms",
    "messages",
    "sentiment_avg",
    "completion_tokens",
    "customer_messages",
    "customer_sentiment_avg",
    "agent_sentiment_avg",
    "chat_messages",
    "chat_completion_tokens",
    "dead_letters",
]


def ms_to_datetime(value: Any) -> datetime | None:
    """UTC datetime from epoch milliseconds; None when not a plausible timestamp."""
    number = as_number(value)
    if number is None or number <= 0:
        return None
    try:
        return datetime.fromtimestamp(number / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def role_sentiment(conversation: Mapping[str, Any], role: str) -> tuple[float | None, float | None]:
    """(first, latest) sentiment score of one role's messages in a conversation.

    From the aggregator's per-role totals (`roles`) when present, else from `sentiments`.
    """
    totals = as_dict(as_dict(conversation.get("roles")).get(role))
    first, last = as_number(totals.get("sentiment_first")), as_number(totals.get("sentiment_last"))
    if first is not None or last is not None:
        return first, last
    scores = [
        score
        for item in as_list(conversation.get("sentiments"))
        if as_dict(item).get("role") == role
        and (score := as_number(as_dict(item).get("score"))) is not None
    ]
    return (scores[0], scores[-1]) if scores else (None, None)


def card_summary(conversation: Mapping[str, Any]) -> tuple[str, str]:
    """(what the customer wants, scenario) from the conversation's scenario card; "" if none."""
    card = as_dict(conversation.get("card"))
    return as_text(card.get("wants")), as_text(card.get("scenario"))


def summarize(conversation: Mapping[str, Any], status: str | None = None) -> dict[str, Any]:
    """One table row from a conversation document; `status` is the set it was listed in."""
    customer = as_dict(conversation.get("customer"))
    agent = as_dict(conversation.get("agent"))
    scores = [
        score
        for item in as_list(conversation.get("sentiments"))
        if (score := as_number(as_dict(item).get("score"))) is not None
    ]
    started = as_number(conversation.get("started_ms"))
    ended = as_number(conversation.get("ended_ms"))
    updated = as_number(conversation.get("updated_ms"))
    finish = ended if ended is not None else updated
    listed_status = status or as_text(conversation.get("status"), "active")
    customer_first, customer_now = role_sentiment(conversation, "customer")
    return {
        "conversation_id": as_text(conversation.get("conversation_id")),
        "status": listed_status if listed_status in STATUSES else "active",
        "customer": as_text(customer.get("name")),
        "mood": as_text(customer.get("mood")),
        "product": as_text(customer.get("product")),
        "agent": as_text(agent.get("name")),
        "model": as_text(conversation.get("model")),
        "turns": as_int(conversation.get("messages"), len(scores)),
        "customer_first": customer_first,
        "customer_now": customer_now,
        "agent_now": role_sentiment(conversation, "agent")[1],
        "sentiment_avg": as_number(conversation.get("sentiment_avg")),
        "sentiment_last": as_number(conversation.get("sentiment_last")),
        "sentiment_trend": scores[-TREND_POINTS:],
        "end_reason": as_text(conversation.get("end_reason")) or None,
        "outcome": as_text(conversation.get("outcome")) or None,
        "wants": card_summary(conversation)[0],
        "started": ms_to_datetime(started),
        "updated": ms_to_datetime(updated),
        "ended": ms_to_datetime(ended),
        "duration_s": (
            round((finish - started) / 1000, 1)
            if started is not None and finish is not None and finish >= started
            else None
        ),
        "prompt_tokens": as_int(conversation.get("prompt_tokens")),
        "completion_tokens": as_int(conversation.get("completion_tokens")),
        "latency_ms_avg": as_number(conversation.get("latency_ms_avg")),
    }


def conversation_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The conversations table: one row per conversation, columns as CONVERSATION_COLUMNS."""
    frame = pd.DataFrame(list(rows), columns=CONVERSATION_COLUMNS)
    for column in ("started", "updated", "ended"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    numeric = ("customer_first", "customer_now", "agent_now", "sentiment_avg", "sentiment_last")
    for column in (*numeric, "duration_s", "latency_ms_avg"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    for column in ("turns", "prompt_tokens", "completion_tokens"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").fillna(0).astype("int64")
    return frame


def series_frame(series: Any, pipeline: Any = None) -> pd.DataFrame:
    """The fleet's sentiment series as a table, oldest bucket first; bad entries skipped.

    The chat and dead-letter counts of `pipeline`'s series join it by bucket (a bucket with
    chat messages and none scored yet is a row too).
    """
    rows = []
    counted: dict[int, dict[str, int]] = {}
    for item in as_list(as_dict(pipeline).get("series")):
        bucket = as_dict(item)
        start = as_number(bucket.get("bucket_ms"))
        if ms_to_datetime(start) is not None:
            counted[int(start)] = {
                name: as_int(bucket.get(name))
                for name in ("chat_messages", "chat_completion_tokens", "dead_letters")
            }
    for item in as_list(series):
        bucket = as_dict(item)
        start = as_number(bucket.get("bucket_ms"))
        when = ms_to_datetime(start)
        if when is None:
            continue
        rows.append(
            {
                "time": when,
                "bucket_ms": int(start),
                "messages": as_int(bucket.get("messages")),
                "sentiment_avg": as_number(bucket.get("sentiment_avg")),
                "completion_tokens": as_int(bucket.get("completion_tokens")),
                "customer_messages": as_int(bucket.get("customer_messages")),
                "customer_sentiment_avg": as_number(bucket.get("customer_sentiment_avg")),
                "agent_sentiment_avg": as_number(bucket.get("agent_sentiment_avg")),
                **counted.pop(
                    int(start),
                    {"chat_messages": 0, "chat_completion_tokens": 0, "dead_letters": 0},
                ),
            }
        )
    for start, counts in counted.items():
        rows.append(
            {
                "time": ms_to_datetime(start),
                "bucket_ms": start,
                "messages": 0,
                "completion_tokens": 0,
                "customer_messages": 0,
                **counts,
            }
        )
    frame = pd.DataFrame(rows, columns=SERIES_COLUMNS)
    for column in ("messages", "completion_tokens", "customer_messages", *counted_columns()):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").fillna(0).astype("int64")
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    for column in ("sentiment_avg", "customer_sentiment_avg", "agent_sentiment_avg"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame.sort_values("bucket_ms", kind="stable").reset_index(drop=True)


def counted_columns() -> tuple[str, ...]:
    """Series columns that come from the `pipeline` key."""
    return ("chat_messages", "chat_completion_tokens", "dead_letters")
