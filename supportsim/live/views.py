"""Data behind the live dashboard: read the redis_aggregator's keys and shape them for display.

No Streamlit here, so all of it is testable with plain pytest. The dashboard reads Redis only;
every key may be missing or malformed: the models of :mod:`supportsim.contract.live_view` read
what is there, with defaults for the rest, instead of raising.

Keys read (P is `REDIS_KEY_PREFIX`), all written by the redis_aggregator:

- `P conversation:{id}`: one conversation (persona, counters, sentiments, recent messages)
- `P conversations:active` / `P conversations:ended`: sorted sets scored by updated_ms / ended_ms
- `P fleet`: fleet-wide aggregates, with the series' bucket size (`series_bucket_ms`)
- `P series:sentiment`: list of buckets (10 s unless the fleet says otherwise), oldest first
- `P pipeline`: chat and dead-letter counts (what the bots wrote, how far scoring is behind)
"""

from __future__ import annotations

import io
import string
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd

from supportsim.contract.live_view import DEFAULT_BUCKET_MS, Conversation, Fleet, FleetGroup
from supportsim.live.frames import card_summary, ms_to_datetime, role_sentiment
from supportsim.live.store import Snapshot

RATE_WINDOW_MS = 60_000  # headline rates cover the last minute of buckets
DEAD_LETTER_WINDOW_MS = 300_000  # the headline counts dead letters of the last five minutes
BEHIND_WARNING_MESSAGES = 20  # scoring this far behind the chat gets a warning on the page
BEHIND_WARNING_MS = 30_000
WALL_MESSAGES = 6  # messages shown per wall tile (the latest ones)
START_HINT = (
    "No conversations yet. Start the system with `./dev up` (or `supportsim up`) on this "
    "machine, or `docker compose up`; conversations appear here within seconds."
)

BREAKDOWN_COLUMNS = ["conversations", "messages", "sentiment_avg"]


# --- text -----------------------------------------------------------------------------------


def escape_markdown(text: str) -> str:
    """Text made literal for Streamlit's markdown elements (each ASCII punctuation escaped).

    CommonMark treats a backslash before any ASCII punctuation as that character, so this
    also disarms Streamlit's own `:color[...]`, `:emoji:` and `$math$` syntax and raw HTML.
    """
    flat = " ".join(text.split())
    return "".join("\\" + ch if ch in string.punctuation else ch for ch in flat)


# --- shaping --------------------------------------------------------------------------------


def ending(conversation: Conversation) -> str | None:
    """How an ended conversation ended: its `outcome`, else its `end_reason`; None if active."""
    if conversation.status != "ended":
        return None
    return conversation.outcome or conversation.end_reason or "unknown"


def recent_rates(
    series: pd.DataFrame,
    now: int,
    window_ms: int = RATE_WINDOW_MS,
    bucket_ms: int = DEFAULT_BUCKET_MS,
    *,
    messages: str = "messages",
    tokens: str = "completion_tokens",
) -> tuple[float | None, float | None]:
    """(messages per minute, completion tokens per second) over the buckets of the last window.

    Buckets that start inside the window count; the span is the whole window once the series
    is older than it (a missing bucket means nothing happened), else the time since the first
    bucket, never less than one bucket (a young system would otherwise show a spike).
    None, None when there is no series at all. `messages` and `tokens` name the columns counted;
    `bucket_ms` is the series' bucket size (:attr:`Snapshot.bucket_ms`).
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


def _groups(fleet: Fleet, by: str) -> dict[str, FleetGroup]:
    return fleet.by_mood if by == "mood" else fleet.by_product


def breakdown(fleet: Fleet, conversations: pd.DataFrame, by: str) -> pd.DataFrame:
    """Conversations, messages and average customer sentiment per mood or product.

    From the fleet aggregate (`by_mood` / `by_product`: its customer messages, or all messages
    from an aggregator that does not split them) when present, else from the conversations
    table (each conversation's latest customer score, each conversation weighing the same).
    Indexed by the mood or product.
    """
    rows = []
    for name, group in _groups(fleet, by).items():
        split = group.customer_messages is not None
        rows.append(
            {
                by: name,
                "conversations": group.conversations,
                "messages": group.customer_messages if split else group.messages,
                "sentiment_avg": group.customer_sentiment_avg if split else group.sentiment_avg,
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


def _role_now(fleet: Fleet, role: str) -> float | None:
    totals = fleet.roles.get(role)
    return totals.sentiment_now if totals is not None else None


def headline(snapshot: Snapshot) -> Headline:
    """Headline figures: counts from the sets and the fleet, rates from the recent buckets.

    Sentiment "now" is the customer's (the agent's beside it): the mean of each active
    conversation's latest customer (agent) score. Rates count what the bots wrote to the chat
    topic by message time, so a backlog in scoring shows as a backlog, not as a pause.
    """
    fleet = snapshot.fleet
    table = snapshot.conversations
    active_rows = table[table["status"] == "active"]
    messages = fleet.messages
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
    chat = pipeline.chat_messages
    from_chat = chat > 0
    per_minute, per_second = recent_rates(
        snapshot.series,
        snapshot.taken_ms,
        bucket_ms=snapshot.bucket_ms,
        messages="chat_messages" if from_chat else "messages",
        tokens="chat_completion_tokens" if from_chat else "completion_tokens",
    )
    chat_newest = pipeline.chat_newest_ms
    scored_newest = fleet.updated_ms
    behind_ms = (
        max(0.0, chat_newest - scored_newest)
        if chat_newest is not None and scored_newest is not None
        else None
    )
    series = snapshot.series
    dead_recent = None
    if pipeline.dead_letters is not None:
        recent = series[series["bucket_ms"] >= snapshot.taken_ms - DEAD_LETTER_WINDOW_MS]
        dead_recent = int(recent["dead_letters"].sum())
    scored = messages if messages is not None else float(table["turns"].sum())
    behind = max(0.0, chat - scored) if from_chat else None
    return Headline(
        active=snapshot.active_total,
        # the ended set may be trimmed by the aggregator; the fleet counts every one
        ended=max(snapshot.ended_total, fleet.ended),
        messages=messages if messages is not None else int(table["turns"].sum()),
        customer_now=customer_now,
        agent_now=agent_now,
        messages_per_minute=per_minute,
        tokens_per_second=per_second,
        behind_messages=int(behind) if behind is not None else None,
        behind_s=behind_ms / 1000 if behind_ms is not None else None,
        dead_letters_recent=dead_recent,
        dead_letters=pipeline.dead_letters,
        rates_from_chat=from_chat,
    )


def end_reasons(fleet: Fleet, conversations: pd.DataFrame) -> dict[str, int]:
    """How many conversations ended for each reason, most frequent first.

    From the fleet aggregate (which counts every ended conversation) when present, else
    counted from the finished conversations listed.
    """
    counts = {reason: count for reason, count in fleet.end_reasons.items() if count > 0}
    if not counts:
        ended = conversations.loc[conversations["status"] == "ended", "end_reason"]
        counts = {str(k): int(v) for k, v in ended.fillna("unknown").value_counts().items()}
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def filter_options(conversations: pd.DataFrame, fleet: Fleet, by: str) -> list[str]:
    """Sorted choices for a mood or product filter (from the table and the fleet)."""
    names = set(conversations[by].dropna()) | set(_groups(fleet, by))
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


def transcript(conversation: Conversation) -> list[TranscriptMessage]:
    """The conversation's stored messages in turn order, with speaker names and sentiment."""
    customer = conversation.customer.name or "Customer"
    agent = conversation.agent.name or "Agent"
    messages = []
    for message in conversation.recent:
        if not message.model_fields_set:
            continue  # an empty entry
        role = message.role if message.role in ("customer", "agent") else "other"
        speaker = {"customer": customer, "agent": agent}.get(role, "Unknown")
        messages.append(
            TranscriptMessage(
                turn=message.turn,
                role=role,
                speaker=speaker,
                text=message.text,
                label=message.label,
                score=message.score,
                time=ms_to_datetime(message.timestamp_ms),
                remedy=message.remedy or None,
            )
        )
    messages.sort(key=lambda m: m.turn)
    return messages


def sentiment_trend(conversation: Conversation) -> pd.DataFrame:
    """Score per turn of one conversation (columns turn, role, label, score)."""
    rows = [
        {
            "turn": point.turn,
            "role": point.role or "other",
            "label": point.label or "unscored",
            "score": point.score,
        }
        for point in conversation.sentiments
        if point.score is not None
    ]
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


def wall_tile(conversation: Conversation, last: int = WALL_MESSAGES) -> Tile:
    """A wall tile from a conversation document."""
    customer = conversation.customer
    messages = transcript(conversation)
    wants, scenario = card_summary(conversation)
    first, now = role_sentiment(conversation, "customer")
    return Tile(
        conversation_id=conversation.conversation_id,
        customer=customer.name or "Customer",
        mood=customer.mood,
        product=customer.product,
        agent=conversation.agent.name or "Agent",
        wants=wants,
        scenario=scenario,
        status=conversation.status,
        ending=ending(conversation),
        remedy=conversation.remedy or None,
        customer_first=first,
        customer_now=now,
        agent_now=role_sentiment(conversation, "agent")[1],
        turns=conversation.messages or len(messages),
        messages=messages[-last:] if last > 0 else [],
    )


# --- reading Redis --------------------------------------------------------------------------


# --- sample data (tests, benchmark, demos) --------------------------------------------------


# --- launching ------------------------------------------------------------------------------
