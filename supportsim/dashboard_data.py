"""Data behind the live dashboard: read the redis_aggregator's keys and shape them for display.

No Streamlit here, so all of it is testable with plain pytest. The dashboard reads Redis only;
every key may be missing or malformed, and each reader returns what is there instead of raising.

Keys read (P is `REDIS_KEY_PREFIX`), all written by the redis_aggregator:

- `P conversation:{id}`: one conversation as JSON (persona, counters, sentiments, recent messages)
- `P conversations:active` / `P conversations:ended`: sorted sets scored by updated_ms / ended_ms
- `P fleet`: fleet-wide aggregates as JSON
- `P series:sentiment`: JSON list of 10-second buckets, oldest first
- `P pipeline`: chat and dead-letter counts (what the bots wrote, how far scoring is behind)
"""

from __future__ import annotations

import io
import json
import math
import string
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import redis
from pydantic import Field
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from supportsim.messages import new_id, now_ms
from supportsim.redis_keys import RedisKeys
from supportsim.settings import RedisSettings

SENTIMENT_LABELS = ("positive", "neutral", "negative")
STATUSES = ("active", "ended")
BUCKET_MS = 10_000
RATE_WINDOW_MS = 60_000  # headline rates cover the last minute of buckets
DEAD_LETTER_WINDOW_MS = 300_000  # the headline counts dead letters of the last five minutes
BEHIND_WARNING_MESSAGES = 20  # scoring this far behind the chat gets a warning on the page
BEHIND_WARNING_MS = 30_000
WALL_MESSAGES = 6  # messages shown per wall tile (the latest ones)
MGET_CHUNK = 500  # keys per MGET; all chunks go in one pipelined round trip
TREND_POINTS = 40  # sentiment points kept per conversation for the table's sparkline
START_HINT = (
    "No conversations yet. Start the system with `./dev up` (or `supportsim up`) on this "
    "machine, or `docker compose up`; conversations appear here within seconds."
)

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
BREAKDOWN_COLUMNS = ["conversations", "messages", "sentiment_avg"]


class DashboardSettings(RedisSettings):
    """Dashboard configuration from the environment (`DASHBOARD_REFRESH_S`, ...)."""

    dashboard_refresh_s: float = Field(2.0, ge=0)  # 0 turns live refresh off
    dashboard_max_ended: int = Field(1000, ge=0)  # finished conversations listed, newest first
    dashboard_port: int | None = Field(None, ge=1, le=65535)  # None: the launcher picks a free one
    dashboard_address: str = "127.0.0.1"
    dashboard_wall_size: int = Field(4, ge=0, le=12)  # conversations on the live wall; 0 hides it
    # seconds (of message time) an ended conversation stays on the wall before it is replaced
    dashboard_wall_linger_s: float = Field(30.0, ge=0)


# --- tolerant parsing -----------------------------------------------------------------------


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


def ms_to_datetime(value: Any) -> datetime | None:
    """UTC datetime from epoch milliseconds; None when not a plausible timestamp."""
    number = as_number(value)
    if number is None or number <= 0:
        return None
    try:
        return datetime.fromtimestamp(number / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def sentiment_label(label: Any) -> str | None:
    """The label when it is one of positive/neutral/negative, else None (unscored)."""
    return label if label in SENTIMENT_LABELS else None


def escape_markdown(text: str) -> str:
    """Text made literal for Streamlit's markdown elements (each ASCII punctuation escaped).

    CommonMark treats a backslash before any ASCII punctuation as that character, so this
    also disarms Streamlit's own `:color[...]`, `:emoji:` and `$math$` syntax and raw HTML.
    """
    flat = " ".join(text.split())
    return "".join("\\" + ch if ch in string.punctuation else ch for ch in flat)


# --- shaping --------------------------------------------------------------------------------


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


def ending(conversation: Mapping[str, Any]) -> str | None:
    """How an ended conversation ended: its `outcome`, else its `end_reason`; None if active."""
    if as_text(conversation.get("status")) != "ended":
        return None
    return (
        as_text(conversation.get("outcome")) or as_text(conversation.get("end_reason")) or "unknown"
    )


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


def recent_rates(
    series: pd.DataFrame,
    now: int,
    window_ms: int = RATE_WINDOW_MS,
    bucket_ms: int = BUCKET_MS,
    *,
    messages: str = "messages",
    tokens: str = "completion_tokens",
) -> tuple[float | None, float | None]:
    """(messages per minute, completion tokens per second) over the buckets of the last window.

    Buckets that start inside the window count; the span is the whole window once the series
    is older than it (a missing bucket means nothing happened), else the time since the first
    bucket, never less than one bucket (a young system would otherwise show a spike).
    None, None when there is no series at all. `messages` and `tokens` name the columns counted.
    """
    if series.empty:
        return None, None
    start = now - window_ms
    recent = series[series["bucket_ms"] >= start]
    first_bucket = int(series["bucket_ms"].min())
    span_ms = max(now - max(start, first_bucket), bucket_ms)
    count = float(recent[messages].sum())
    generated = float(recent[tokens].sum())
    return count * 60_000 / span_ms, generated * 1000 / span_ms


def breakdown(fleet: Mapping[str, Any], conversations: pd.DataFrame, by: str) -> pd.DataFrame:
    """Conversations, messages and average customer sentiment per mood or product.

    From the fleet aggregate (`by_mood` / `by_product`: its customer messages, or all messages
    from an aggregator that does not split them) when present, else from the conversations
    table (each conversation's latest customer score, each conversation weighing the same).
    Indexed by the mood or product.
    """
    rows = []
    for name, stats in as_dict(fleet.get(f"by_{by}")).items():
        values = as_dict(stats)
        split = "customer_sentiment_avg" in values
        rows.append(
            {
                by: as_text(name),
                "conversations": as_int(values.get("conversations")),
                "messages": as_int(values.get("customer_messages" if split else "messages")),
                "sentiment_avg": as_number(
                    values.get("customer_sentiment_avg" if split else "sentiment_avg")
                ),
            }
        )
    if not rows and not conversations.empty:
        for name, group in conversations.groupby(by, sort=True):
            scores = group["customer_now"].dropna()
            rows.append(
                {
                    by: name,
                    "conversations": len(group),
                    "messages": int(group["turns"].sum()),
                    "sentiment_avg": float(scores.mean()) if not scores.empty else None,
                }
            )
    frame = pd.DataFrame(rows, columns=[by, *BREAKDOWN_COLUMNS])
    frame["sentiment_avg"] = pd.to_numeric(frame["sentiment_avg"], errors="coerce")
    return frame.sort_values(by).reset_index(drop=True)


@dataclass(frozen=True)
class Headline:
    """The figures at the top of the dashboard; None where nothing is known."""

    active: int
    ended: int
    messages: int
    customer_now: float | None  # mean latest customer score over the active conversations
    agent_now: float | None
    messages_per_minute: float | None  # messages the bots wrote (chat), by message time
    tokens_per_second: float | None
    behind_messages: int | None  # chat messages not scored (or not aggregated) yet
    behind_s: float | None  # message time between the newest chat and newest scored message
    dead_letters_recent: int | None  # dead letters in the last DEAD_LETTER_WINDOW_MS
    dead_letters: int | None  # dead letters counted since the aggregator started reading them
    rates_from_chat: bool  # False: rates from scored messages (no chat figures in Redis)

    @property
    def behind(self) -> bool:
        """True when scoring is far enough behind the chat to warn about it."""
        return (self.behind_messages or 0) >= BEHIND_WARNING_MESSAGES or (
            self.behind_s or 0
        ) * 1000 >= BEHIND_WARNING_MS


def _role_now(fleet: Mapping[str, Any], role: str) -> float | None:
    return as_number(as_dict(as_dict(fleet.get("roles")).get(role)).get("sentiment_now"))


def headline(snapshot: Snapshot) -> Headline:
    """Headline figures: counts from the sets and the fleet, rates from the recent buckets.

    Sentiment "now" is the customer's (the agent's beside it): the mean of each active
    conversation's latest customer (agent) score. Rates count what the bots wrote to the chat
    topic by message time, so a backlog in scoring shows as a backlog, not as a pause.
    """
    fleet = snapshot.fleet
    table = snapshot.conversations
    active_rows = table[table["status"] == "active"]
    messages = as_number(fleet.get("messages"))
    customer_now = _role_now(fleet, "customer")
    agent_now = _role_now(fleet, "agent")
    if customer_now is None and not active_rows.empty:
        scores = active_rows["customer_now"].dropna()
        customer_now = float(scores.mean()) if not scores.empty else None
    if agent_now is None and not active_rows.empty:
        scores = active_rows["agent_now"].dropna()
        agent_now = float(scores.mean()) if not scores.empty else None
    if customer_now is None:
        latest = snapshot.series["customer_sentiment_avg"].dropna()
        customer_now = float(latest.iloc[-1]) if not latest.empty else None
    pipeline = snapshot.pipeline
    chat = as_int(pipeline.get("chat_messages"))
    from_chat = chat > 0
    per_minute, per_second = recent_rates(
        snapshot.series,
        snapshot.taken_ms,
        messages="chat_messages" if from_chat else "messages",
        tokens="chat_completion_tokens" if from_chat else "completion_tokens",
    )
    chat_newest = as_number(pipeline.get("chat_newest_ms"))
    scored_newest = as_number(fleet.get("updated_ms"))
    behind_ms = (
        max(0.0, chat_newest - scored_newest)
        if chat_newest is not None and scored_newest is not None
        else None
    )
    series = snapshot.series
    dead_recent = None
    if "dead_letters" in pipeline:
        recent = series[series["bucket_ms"] >= snapshot.taken_ms - DEAD_LETTER_WINDOW_MS]
        dead_recent = int(recent["dead_letters"].sum())
    scored = messages if messages is not None else float(table["turns"].sum())
    behind = max(0.0, chat - scored) if from_chat else None
    return Headline(
        active=snapshot.active_total,
        # the ended set may be trimmed by the aggregator; the fleet counts every one
        ended=max(snapshot.ended_total, as_int(fleet.get("ended"))),
        messages=int(messages) if messages is not None else int(table["turns"].sum()),
        customer_now=customer_now,
        agent_now=agent_now,
        messages_per_minute=per_minute,
        tokens_per_second=per_second,
        behind_messages=int(behind) if behind is not None else None,
        behind_s=behind_ms / 1000 if behind_ms is not None else None,
        dead_letters_recent=dead_recent,
        dead_letters=as_int(pipeline.get("dead_letters")) if "dead_letters" in pipeline else None,
        rates_from_chat=from_chat,
    )


def end_reasons(fleet: Mapping[str, Any], conversations: pd.DataFrame) -> dict[str, int]:
    """How many conversations ended for each reason, most frequent first.

    From the fleet aggregate (which counts every ended conversation) when present, else
    counted from the finished conversations listed.
    """
    counts = {
        as_text(reason): as_int(count)
        for reason, count in as_dict(fleet.get("end_reasons")).items()
        if as_int(count) > 0
    }
    if not counts:
        ended = conversations.loc[conversations["status"] == "ended", "end_reason"]
        counts = {str(k): int(v) for k, v in ended.fillna("unknown").value_counts().items()}
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def filter_options(conversations: pd.DataFrame, fleet: Mapping[str, Any], by: str) -> list[str]:
    """Sorted choices for a mood or product filter (from the table and the fleet)."""
    names = set(conversations[by].dropna()) | set(as_dict(fleet.get(f"by_{by}")))
    return sorted(name for name in names if isinstance(name, str) and name)


def filter_conversations(
    conversations: pd.DataFrame,
    *,
    moods: Sequence[str] = (),
    products: Sequence[str] = (),
    statuses: Sequence[str] = (),
    search: str = "",
) -> pd.DataFrame:
    """Rows matching every given filter; an empty choice means no filter on that column.

    `search` matches, case-insensitively, a substring of the customer, agent, product or id.
    """
    mask = pd.Series(True, index=conversations.index)
    if moods:
        mask &= conversations["mood"].isin(list(moods))
    if products:
        mask &= conversations["product"].isin(list(products))
    if statuses:
        mask &= conversations["status"].isin(list(statuses))
    needle = search.strip().lower()
    if needle:
        haystack = (
            conversations["customer"]
            + "\n"
            + conversations["agent"]
            + "\n"
            + conversations["product"]
            + "\n"
            + conversations["conversation_id"]
        ).str.lower()
        mask &= haystack.str.contains(needle, regex=False)
    return conversations[mask]


def _spreadsheet_safe(value: Any) -> Any:
    # a cell starting with = + - @ is run as a formula by spreadsheet programs
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def conversations_csv(conversations: pd.DataFrame) -> bytes:
    """The conversations in view as UTF-8 CSV (times in ISO 8601 UTC, trend as scores)."""
    frame = conversations.copy()
    frame["sentiment_trend"] = [
        " ".join(f"{score:.3f}" for score in scores) for scores in frame["sentiment_trend"]
    ]
    for column in ("started", "updated", "ended"):
        frame[column] = frame[column].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ").fillna("")
    for column in ("customer", "mood", "product", "agent", "model", "end_reason"):
        frame[column] = [_spreadsheet_safe(value) for value in frame[column]]
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.4f")
    return buffer.getvalue().encode("utf-8")


@dataclass(frozen=True)
class TranscriptMessage:
    """One message as the transcript shows it."""

    turn: int
    role: str  # customer, agent, or other (an unknown role from bad data)
    speaker: str
    text: str
    label: str | None
    score: float | None
    time: datetime | None
    remedy: str | None = None  # the remedy an agent offered in this message


def transcript(conversation: Mapping[str, Any]) -> list[TranscriptMessage]:
    """The conversation's stored messages in turn order, with speaker names and sentiment."""
    customer = as_text(as_dict(conversation.get("customer")).get("name")) or "Customer"
    agent = as_text(as_dict(conversation.get("agent")).get("name")) or "Agent"
    messages = []
    for item in as_list(conversation.get("recent")):
        message = as_dict(item)
        if not message:
            continue
        role = as_text(message.get("role"))
        role = role if role in ("customer", "agent") else "other"
        speaker = {"customer": customer, "agent": agent}.get(role, "Unknown")
        messages.append(
            TranscriptMessage(
                turn=as_int(message.get("turn"), -1),
                role=role,
                speaker=speaker,
                text=as_text(message.get("text")),
                label=sentiment_label(message.get("label")),
                score=as_number(message.get("score")),
                time=ms_to_datetime(message.get("timestamp_ms")),
                remedy=as_text(message.get("remedy")) or None,
            )
        )
    messages.sort(key=lambda m: m.turn)
    return messages


def sentiment_trend(conversation: Mapping[str, Any]) -> pd.DataFrame:
    """Score per turn of one conversation (columns turn, role, label, score)."""
    rows = []
    for item in as_list(conversation.get("sentiments")):
        point = as_dict(item)
        score = as_number(point.get("score"))
        if score is None:
            continue
        rows.append(
            {
                "turn": as_int(point.get("turn"), -1),
                "role": as_text(point.get("role"), "other"),
                "label": sentiment_label(point.get("label")) or "unscored",
                "score": score,
            }
        )
    return pd.DataFrame(rows, columns=["turn", "role", "label", "score"]).sort_values("turn")


def persona_labels(conversations: pd.DataFrame) -> dict[str, str]:
    """Plain-text label per conversation id, as the conversation picker shows them."""
    columns = ["conversation_id", "customer", "mood", "product", "agent", "turns", "status"]
    labels = {}
    for cid, who, mood, product, agent, turns, status, reason in zip(
        *(conversations[c] for c in columns), conversations["end_reason"], strict=True
    ):
        state = f"ended: {reason}" if status == "ended" and reason else status
        labels[cid] = (
            f"{who or 'unknown customer'} ({mood or '?'}, {product or '?'}) with {agent or '?'}, "
            f"{turns} turns, {state} [{cid[:8]}]"
        )
    return labels


# --- the live wall --------------------------------------------------------------------------


def wall_ranking(conversations: pd.DataFrame, linger_ms: float) -> list[str]:
    """Conversations that may be on the wall, most recently active first.

    Active ones, and ended ones whose end is within `linger_ms` of the newest message listed:
    the data's own clock, so scoring that runs behind does not cut the linger short.
    """
    if conversations.empty:
        return []
    updated = conversations["updated"]
    newest = updated.max()
    if pd.isna(newest):
        return []
    ended_at = conversations["ended"].fillna(updated)
    lingering = (conversations["status"] == "ended") & (
        (newest - ended_at) <= pd.Timedelta(milliseconds=linger_ms)
    )
    shown = conversations[(conversations["status"] == "active") | lingering]
    ranked = shown.sort_values("updated", ascending=False, kind="stable", na_position="last")
    return ranked["conversation_id"].tolist()


def wall_slots(
    previous: Sequence[str | None], ranking: Sequence[str], size: int
) -> list[str | None]:
    """Which conversation each of `size` wall tiles shows, given what it showed before.

    Rule: a tile keeps its conversation while that one ranks among the 2 x `size` most
    recently active; free tiles take the most recently active conversations not shown yet.
    So tiles stay put as turns arrive, and with many conversations they do not flicker.
    """
    if size <= 0:
        return []
    sticky = set(ranking[: 2 * size])
    slots: list[str | None] = [cid if cid in sticky else None for cid in list(previous)[:size]]
    slots += [None] * (size - len(slots))
    shown = {cid for cid in slots if cid}
    fresh = (cid for cid in ranking if cid not in shown)
    for index, cid in enumerate(slots):
        if cid is None:
            slots[index] = next(fresh, None)
    return slots


@dataclass(frozen=True)
class Tile:
    """One conversation as a wall tile shows it."""

    conversation_id: str
    customer: str
    mood: str
    product: str
    agent: str
    wants: str  # the scenario card's summary of what the customer wants ("" without a card)
    scenario: str
    status: str  # active or ended
    ending: str | None  # outcome (else end reason) once ended
    remedy: str | None  # the latest remedy the agent offered
    customer_first: float | None
    customer_now: float | None
    agent_now: float | None
    turns: int
    messages: list[TranscriptMessage]  # the latest WALL_MESSAGES, oldest first


def wall_tile(conversation: Mapping[str, Any], last: int = WALL_MESSAGES) -> Tile:
    """A wall tile from a conversation document."""
    customer = as_dict(conversation.get("customer"))
    agent = as_dict(conversation.get("agent"))
    messages = transcript(conversation)
    wants, scenario = card_summary(conversation)
    first, now = role_sentiment(conversation, "customer")
    status = as_text(conversation.get("status"), "active")
    return Tile(
        conversation_id=as_text(conversation.get("conversation_id")),
        customer=as_text(customer.get("name")) or "Customer",
        mood=as_text(customer.get("mood")),
        product=as_text(customer.get("product")),
        agent=as_text(agent.get("name")) or "Agent",
        wants=wants,
        scenario=scenario,
        status="ended" if status == "ended" else "active",
        ending=ending(conversation),
        remedy=as_text(conversation.get("remedy")) or None,
        customer_first=first,
        customer_now=now,
        agent_now=role_sentiment(conversation, "agent")[1],
        turns=as_int(conversation.get("messages"), len(messages)),
        messages=messages[-last:] if last > 0 else [],
    )


# --- reading Redis --------------------------------------------------------------------------


@dataclass
class Snapshot:
    """Everything one dashboard render needs, read in a handful of round trips."""

    conversations: pd.DataFrame
    fleet: dict[str, Any]
    series: pd.DataFrame
    active_total: int
    ended_total: int
    unreadable: int  # listed conversations whose document is not valid JSON
    taken_ms: int
    pipeline: dict[str, Any] = field(default_factory=dict)  # the `pipeline` key (chat counts)

    @property
    def empty(self) -> bool:
        """True when nothing has been aggregated yet."""
        return (
            self.conversations.empty
            and self.active_total == 0
            and self.ended_total == 0
            and as_int(self.fleet.get("started")) == 0
            and as_int(self.fleet.get("messages")) == 0
        )


@dataclass
class _Cached:
    version: tuple[str, float]
    row: dict[str, Any]


@dataclass
class DashboardStore:
    """Reads the aggregator's keys from one Redis under one prefix.

    Keeps the table rows between reads: a conversation's score in its set (updated_ms while
    active, ended_ms once ended) is its version, so a refresh fetches only new and changed
    conversations, with pipelined MGETs in chunks. Safe to share between sessions.
    """

    client: redis.Redis
    keys: RedisKeys
    max_ended: int = 1000
    chunk: int = MGET_CHUNK
    _rows: dict[str, _Cached] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_settings(cls, settings: DashboardSettings) -> DashboardStore:
        """A store for the configured Redis and prefix."""
        client = redis.Redis.from_url(
            settings.redis_url.get_secret_value(),
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=3,
            health_check_interval=30,
            # one quick retry: when Redis is down the page says so at once and retries next refresh
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        )
        return cls(client, RedisKeys(settings.redis_key_prefix), settings.dashboard_max_ended)

    def conversation(self, conversation_id: str) -> dict[str, Any] | None:
        """One conversation's document, or None when missing or malformed."""
        document = parse_json(self.client.get(self.keys.conversation(conversation_id)))
        return document if isinstance(document, dict) else None

    def conversations(self, conversation_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Documents of several conversations by id, in one round trip (missing ones left out)."""
        return self._fetch(list(conversation_ids))[0]

    def snapshot(self) -> Snapshot:
        """Fleet, series and every listed conversation's row (active first, newest first)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zrevrange(self.keys.active, 0, -1, withscores=True)
        if self.max_ended:
            pipe.zrevrange(self.keys.ended, 0, self.max_ended - 1, withscores=True)
        pipe.zcard(self.keys.ended)
        pipe.get(self.keys.fleet)
        pipe.get(self.keys.series)
        pipe.get(self.keys.pipeline)
        replies = pipe.execute(raise_on_error=False)
        active, *rest = replies
        ended = rest.pop(0) if self.max_ended else []
        ended_total, fleet_raw, series_raw, pipeline_raw = rest
        pipeline = as_dict(parse_json(pipeline_raw) if isinstance(pipeline_raw, str) else None)
        listed: dict[str, tuple[str, float]] = {}
        for status, members in (("active", active), ("ended", ended)):
            if isinstance(members, list):
                for member, score in members:
                    listed[member] = (status, score)  # ended wins over a stale active entry
        rows, missing, unreadable = self._rows_for(listed)
        missing_ended = sum(1 for cid in missing if listed[cid][0] == "ended")
        return Snapshot(
            conversations=conversation_frame(rows),
            fleet=as_dict(parse_json(fleet_raw) if isinstance(fleet_raw, str) else None),
            series=series_frame(
                parse_json(series_raw) if isinstance(series_raw, str) else None, pipeline
            ),
            active_total=sum(
                1
                for cid, (status, _) in listed.items()
                if status == "active" and cid not in missing
            ),
            ended_total=(ended_total if isinstance(ended_total, int) else len(ended))
            - missing_ended,
            unreadable=unreadable,
            taken_ms=now_ms(),
            pipeline=pipeline,
        )

    def _rows_for(self, listed: dict[str, tuple[str, float]]) -> tuple[list[dict], set[str], int]:
        """Rows of the listed conversations, newest first; also the ids whose document is
        gone (expired between the aggregator's trims) and how many are malformed."""
        with self._lock:
            for gone in self._rows.keys() - listed.keys():
                del self._rows[gone]
            stale = [
                cid
                for cid, version in listed.items()
                if (cached := self._rows.get(cid)) is None or cached.version != version
            ]
            fresh, malformed = self._fetch(stale)
            missing = set(stale) - fresh.keys() - malformed
            rows_by_id: dict[str, dict] = {}
            for cid, version in listed.items():
                if cid in fresh:
                    document = fresh[cid]
                    row = summarize(document, version[0])
                    row["conversation_id"] = cid
                    if _consistent(document, version):
                        self._rows[cid] = _Cached(version, row)
                    rows_by_id[cid] = row
                elif cid in self._rows and cid not in stale:
                    rows_by_id[cid] = self._rows[cid].row
        order = sorted(
            rows_by_id,
            key=lambda cid: (listed[cid][0] != "active", -listed[cid][1]),
        )
        return [rows_by_id[cid] for cid in order], missing, len(malformed)

    def _fetch(self, conversation_ids: list[str]) -> tuple[dict[str, dict], set[str]]:
        """Documents by id (pipelined MGETs in chunks), and the ids whose value is not JSON."""
        documents: dict[str, dict] = {}
        malformed: set[str] = set()
        if not conversation_ids:
            return documents, malformed
        pipe = self.client.pipeline(transaction=False)
        for start in range(0, len(conversation_ids), self.chunk):
            chunk = conversation_ids[start : start + self.chunk]
            pipe.mget([self.keys.conversation(cid) for cid in chunk])
        for start, values in zip(
            range(0, len(conversation_ids), self.chunk), pipe.execute(), strict=True
        ):
            for cid, raw in zip(conversation_ids[start : start + self.chunk], values, strict=True):
                if raw is None:
                    continue  # expired, or not a string: nothing to show
                document = parse_json(raw)
                if isinstance(document, dict):
                    documents[cid] = document
                else:
                    malformed.add(cid)
        return documents, malformed


def _consistent(document: Mapping[str, Any], version: tuple[str, float]) -> bool:
    # the aggregator may update the set and the document in two steps: cache a row only when
    # the document has caught up with its set entry, else read it again next time
    status, score = version
    if status == "ended":
        return document.get("status") == "ended"
    updated = as_number(document.get("updated_ms"))
    return updated is not None and updated >= score


# --- sample data (tests, benchmark, demos) --------------------------------------------------

SAMPLE_MOODS = ("angry", "confused", "impatient", "polite", "sarcastic")
SAMPLE_PRODUCTS = ("laptop", "router", "phone", "headphones", "smart watch")
SAMPLE_NAMES = ("Dana", "Lee", "Ravi", "Mia", "Jonas", "Aiko", "Omar", "Zoe")


SAMPLE_WANTS = (
    "a replacement unit shipped this week",
    "a full refund, not store credit",
    "to know why the repair took a month",
    "someone to fix it without sending it back",
)
SAMPLE_REMEDIES = ("replacement", "refund", "repair", "voucher")


def sample_conversation(
    index: int,
    *,
    turns: int = 6,
    status: str = "active",
    end_reason: str | None = None,
    started_ms: int | None = None,
    texts: Sequence[str] | None = None,
    outcome: str | None = None,
    card: bool = True,
) -> dict[str, Any]:
    """A conversation document in the aggregator's layout, varied by `index`.

    With `card`, the customer has a scenario card and the agent offers a remedy on its last
    turn; an ended conversation has `outcome` when given (else only its `end_reason`).
    """
    started = started_ms if started_ms is not None else now_ms() - 60_000
    sentiments, recent = [], []
    roles: dict[str, dict[str, Any]] = {}
    remedy = SAMPLE_REMEDIES[index % len(SAMPLE_REMEDIES)] if card else None
    last_agent = max((t for t in range(turns) if t % 2), default=None)
    for turn in range(turns):
        role = "customer" if turn % 2 == 0 else "agent"
        score = round(math.sin(index + turn) * 0.9, 3)
        label = "positive" if score > 0.25 else "negative" if score < -0.25 else "neutral"
        text = texts[turn] if texts and turn < len(texts) else f"{role} says message {turn}"
        sentiments.append({"turn": turn, "role": role, "label": label, "score": score})
        message = {
            "message_id": new_id(),
            "turn": turn,
            "role": role,
            "text": text,
            "label": label,
            "score": score,
            "timestamp_ms": started + turn * 5000,
        }
        if remedy and turn == last_agent:
            message["remedy"] = remedy
        recent.append(message)
        totals = roles.setdefault(
            role, {"messages": 0, "sentiment_sum_micro": 0, "sentiment_first": score}
        )
        totals["messages"] += 1
        totals["sentiment_sum_micro"] += round(score * 1_000_000)
        totals["sentiment_avg"] = round(
            totals["sentiment_sum_micro"] / totals["messages"] / 1_000_000, 6
        )
        totals["sentiment_last"] = score
    updated = started + max(turns - 1, 0) * 5000
    scores = [s["score"] for s in sentiments]
    ended = status == "ended"
    return {
        "conversation_id": new_id(),
        "customer": {
            "name": SAMPLE_NAMES[index % len(SAMPLE_NAMES)],
            "mood": SAMPLE_MOODS[index % len(SAMPLE_MOODS)],
            "product": SAMPLE_PRODUCTS[(index // len(SAMPLE_MOODS)) % len(SAMPLE_PRODUCTS)],
        },
        "agent": {"name": "Sam" if index % 2 else "Alex"},
        "card": (
            {
                "id": f"card-{index % 40:03d}",
                "scenario": "defective product",
                "product": SAMPLE_PRODUCTS[(index // len(SAMPLE_MOODS)) % len(SAMPLE_PRODUCTS)],
                "facts": {"order": f"A-{1000 + index}", "bought": "three weeks ago"},
                "wants": SAMPLE_WANTS[index % len(SAMPLE_WANTS)],
                "refuses": "store credit",
                "patience": 3 + index % 4,
            }
            if card
            else None
        ),
        "model": "sample",
        "models": {"customer": "sample", "agent": "sample"},
        "status": status,
        "end_reason": end_reason if ended else None,
        "outcome": outcome if ended else None,
        "remedy": remedy if last_agent is not None else None,
        "messages": turns,
        "last_turn": turns - 1,
        "sentiment_avg": round(sum(scores) / len(scores), 4) if scores else None,
        "sentiment_last": scores[-1] if scores else None,
        "sentiments": sentiments,
        "roles": roles,
        "recent": recent[-50:],
        "started_ms": started,
        "updated_ms": updated,
        "ended_ms": updated if ended else None,
        "prompt_tokens": 40 * turns,
        "completion_tokens": 25 * turns,
        "latency_ms_avg": 850.0,
        "sentiment_sum_micro": sum(round(score * 1_000_000) for score in scores),
        "latency_ms_total": 850 * turns,
    }


def sample_series(now: int, buckets: int = 30, messages: int = 6) -> list[dict[str, Any]]:
    """A sentiment series of `buckets` full 10-second buckets ending before `now`.

    Half the messages are the customers'; they start low and recover.
    """
    last = now - now % BUCKET_MS - BUCKET_MS
    series = []
    for i in range(buckets):
        customers = messages // 2
        series.append(
            {
                "bucket_ms": last - (buckets - 1 - i) * BUCKET_MS,
                "messages": messages,
                "sentiment_avg": round(math.sin(i / 4) * 0.5, 3),
                "completion_tokens": messages * 25,
                "customer_messages": customers,
                "customer_sentiment_avg": round(math.sin(i / 4) * 0.5 - 0.3, 3),
                "agent_sentiment_avg": round(math.sin(i / 4) * 0.3 + 0.4, 3),
            }
        )
    return series


def sample_pipeline(
    now: int,
    chat_messages: int,
    *,
    buckets: int = 30,
    messages: int = 6,
    dead_letters: int = 0,
) -> dict[str, Any]:
    """The `pipeline` value for `chat_messages` written, the last `buckets` buckets before
    `now` holding `messages` each (the newest one bucket before `now`, as in
    :func:`sample_fleet`), and `dead_letters` in the newest bucket."""
    last = now - now % BUCKET_MS - BUCKET_MS
    return {
        "chat_messages": chat_messages,
        "chat_newest_ms": now - BUCKET_MS,
        "dead_letters": dead_letters,
        "dead_letter_newest_ms": last if dead_letters else None,
        "series": [
            {
                "bucket_ms": last - (buckets - 1 - i) * BUCKET_MS,
                "chat_messages": messages,
                "chat_completion_tokens": messages * 25,
                "dead_letters": dead_letters if i == buckets - 1 else 0,
            }
            for i in range(buckets)
        ],
    }


def write_sample(
    client: redis.Redis,
    prefix: str,
    conversations: Sequence[Mapping[str, Any]],
    *,
    fleet: Mapping[str, Any] | None = None,
    series: Sequence[Mapping[str, Any]] | None = None,
    pipeline: Mapping[str, Any] | None = None,
) -> None:
    """Write conversation documents (and optionally fleet, series and the pipeline counts) as
    the aggregator does."""
    keys = RedisKeys(prefix)
    pipe = client.pipeline(transaction=False)
    for document in conversations:
        cid = document["conversation_id"]
        pipe.set(keys.conversation(cid), json.dumps(document))
        if document.get("status") == "ended":
            pipe.zrem(keys.active, cid)
            pipe.zadd(keys.ended, {cid: document.get("ended_ms") or document["updated_ms"]})
        else:
            pipe.zadd(keys.active, {cid: document["updated_ms"]})
    if fleet is not None:
        pipe.set(keys.fleet, json.dumps(fleet))
    if series is not None:
        pipe.set(keys.series, json.dumps(list(series)))
    if pipeline is not None:
        pipe.set(keys.pipeline, json.dumps(pipeline))
    pipe.execute()


def sample_fleet(
    conversations: Sequence[Mapping[str, Any]], now: int | None = None
) -> dict[str, Any]:
    """The fleet aggregate the aggregator would write for these conversations, its newest
    scored message one bucket before `now` (as :func:`sample_pipeline` has it)."""
    table = conversation_frame(summarize(c) for c in conversations)
    active = table[table["status"] == "active"]
    reasons: dict[str, int] = {}
    for reason in table.loc[table["status"] == "ended", "end_reason"].fillna("unknown"):
        reasons[reason] = reasons.get(reason, 0) + 1
    role_scores: dict[str, list[float]] = {"customer": [], "agent": []}
    by: dict[str, dict[str, dict[str, Any]]] = {"mood": {}, "product": {}}
    for document in conversations:
        customer = as_dict(document.get("customer"))
        active_now = document.get("status") != "ended"
        points = [as_dict(p) for p in as_list(document.get("sentiments"))]
        for point in points:
            if point.get("role") in role_scores:
                role_scores[point["role"]].append(point["score"])
        for name in ("mood", "product"):
            group = by[name].setdefault(
                as_text(customer.get(name)),
                {"conversations": 0, "active": 0, "messages": 0, "all": [], "customer": []},
            )
            group["conversations"] += 1
            group["active"] += active_now
            group["messages"] += len(points)
            group["all"] += [p["score"] for p in points]
            group["customer"] += [p["score"] for p in points if p.get("role") == "customer"]

    def average(values: Sequence[float]) -> float | None:
        return round(sum(values) / len(values), 6) if len(values) else None

    def groups(name: str) -> dict[str, dict[str, Any]]:
        return {
            value: {
                "conversations": g["conversations"],
                "active": g["active"],
                "messages": g["messages"],
                "sentiment_avg": average(g["all"]),
                "customer_messages": len(g["customer"]),
                "customer_sentiment_avg": average(g["customer"]),
            }
            for value, g in by[name].items()
        }

    messages = int(table["turns"].sum())
    completion = int(table["completion_tokens"].sum())
    newest = now if now is not None else now_ms()
    return {
        "active": len(active),
        "ended": len(table) - len(active),
        "started": len(table),
        "abandoned": 0,
        "messages": messages,
        "prompt_tokens": int(table["prompt_tokens"].sum()),
        "completion_tokens": completion,
        "sentiment_avg_active": average(active["sentiment_avg"].dropna().tolist()),
        "sentiment_avg": average(role_scores["customer"] + role_scores["agent"]),
        "latency_ms_avg": 850.0,
        "tokens_per_message": completion / messages if messages else None,
        "completion_tokens_per_message": completion / messages if messages else None,
        "end_reasons": reasons,
        "by_mood": groups("mood"),
        "by_product": groups("product"),
        "roles": {
            role: {
                "messages": len(role_scores[role]),
                "sentiment_avg": average(role_scores[role]),
                "sentiment_now": average(active[f"{role}_now"].dropna().tolist()),
                "sentiment_now_conversations": int(active[f"{role}_now"].notna().sum()),
            }
            for role in ("customer", "agent")
        },
        "updated_ms": newest - BUCKET_MS,
    }


# --- launching ------------------------------------------------------------------------------


def dashboard_argv(port: int, address: str = "127.0.0.1", python: str | None = None) -> list[str]:
    """The command line that serves the dashboard on `address:port` (no browser, no telemetry)."""
    script = Path(__file__).resolve().parent.parent / "dashboard" / "main.py"
    return [
        python or sys.executable,
        "-m",
        "streamlit",
        "run",
        str(script),
        "--server.port",
        str(port),
        "--server.address",
        address,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--client.toolbarMode",
        "minimal",
    ]
