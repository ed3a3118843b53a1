"""Dashboard rows and frames from the Redis documents.

The documents come as the models of :mod:`supportsim.contract.live_view`, which already turned
missing or odd values into defaults; here they become table rows and data frames.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from supportsim.contract.live_view import Conversation, Pipeline, SeriesPoint

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


def ms_to_datetime(value: float | None) -> datetime | None:
    """UTC datetime from epoch milliseconds; None when not a plausible timestamp."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    try:
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def role_sentiment(conversation: Conversation, role: str) -> tuple[float | None, float | None]:
    """(first, latest) sentiment score of one role's messages in a conversation.

    From the aggregator's per-role totals (`roles`) when present, else from `sentiments`.
    """
    totals = conversation.roles.get(role)
    if totals is not None and (
        totals.sentiment_first is not None or totals.sentiment_last is not None
    ):
        return totals.sentiment_first, totals.sentiment_last
    scores = [
        point.score
        for point in conversation.sentiments
        if point.role == role and point.score is not None
    ]
    return (scores[0], scores[-1]) if scores else (None, None)


def card_text(conversation: Conversation, name: str) -> str:
    """One text entry of the conversation's scenario card ("" without a card or that entry).

    The card is free-form (the bots' scenario card), so its entries are checked here.
    """
    value = (conversation.card or {}).get(name)
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return ""


def card_summary(conversation: Conversation) -> tuple[str, str]:
    """(what the customer wants, scenario) from the conversation's scenario card; "" if none."""
    return card_text(conversation, "wants"), card_text(conversation, "scenario")


def summarize(conversation: Conversation, status: str | None = None) -> dict[str, Any]:
    """One table row from a conversation document; `status` is the set it was listed in."""
    customer = conversation.customer
    scores = [point.score for point in conversation.sentiments if point.score is not None]
    started = conversation.started_ms
    ended = conversation.ended_ms
    updated = conversation.updated_ms
    finish = ended if ended is not None else updated
    listed_status = status or conversation.status
    customer_first, customer_now = role_sentiment(conversation, "customer")
    return {
        "conversation_id": conversation.conversation_id,
        "status": listed_status if listed_status in STATUSES else "active",
        "customer": customer.name,
        "mood": customer.mood,
        "product": customer.product,
        "agent": conversation.agent.name,
        "model": conversation.model,
        "turns": conversation.messages or len(scores),
        "customer_first": customer_first,
        "customer_now": customer_now,
        "agent_now": role_sentiment(conversation, "agent")[1],
        "sentiment_avg": conversation.sentiment_avg,
        "sentiment_last": conversation.sentiment_last,
        "sentiment_trend": scores[-TREND_POINTS:],
        "end_reason": conversation.end_reason or None,
        "outcome": conversation.outcome or None,
        "wants": card_text(conversation, "wants"),
        "started": ms_to_datetime(started),
        "updated": ms_to_datetime(updated),
        "ended": ms_to_datetime(ended),
        "duration_s": (
            round((finish - started) / 1000, 1)
            if started is not None and finish is not None and finish >= started
            else None
        ),
        "prompt_tokens": conversation.prompt_tokens,
        "completion_tokens": conversation.completion_tokens,
        "latency_ms_avg": conversation.latency_ms_avg,
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


def series_frame(series: Sequence[SeriesPoint], pipeline: Pipeline | None = None) -> pd.DataFrame:
    """The fleet's sentiment series as a table, oldest bucket first; implausible times skipped.

    The chat and dead-letter counts of `pipeline`'s series join it by bucket (a bucket with
    chat messages and none scored yet is a row too).
    """
    rows = []
    counted: dict[int, dict[str, int]] = {}
    for bucket in pipeline.series if pipeline is not None else ():
        if ms_to_datetime(bucket.bucket_ms) is not None:
            counted[bucket.bucket_ms] = {
                "chat_messages": bucket.chat_messages,
                "chat_completion_tokens": bucket.chat_completion_tokens,
                "dead_letters": bucket.dead_letters,
            }
    for bucket in series:
        start = bucket.bucket_ms
        when = ms_to_datetime(start)
        if when is None:
            continue
        rows.append(
            {
                "time": when,
                "bucket_ms": start,
                "messages": bucket.messages,
                "sentiment_avg": bucket.sentiment_avg,
                "completion_tokens": bucket.completion_tokens,
                "customer_messages": bucket.customer_messages,
                "customer_sentiment_avg": bucket.customer_sentiment_avg,
                "agent_sentiment_avg": bucket.agent_sentiment_avg,
                **counted.pop(
                    start,
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
