"""Live dashboard: conversations, sentiment and throughput, read from Redis only.

Run alone with `streamlit run dashboard/main.py`. Configuration comes from the environment:
REDIS_URL, REDIS_KEY_PREFIX, DASHBOARD_REFRESH_S (seconds between live refreshes, 0 for off),
DASHBOARD_MAX_ENDED (how many finished conversations to list), DASHBOARD_WALL_SIZE (tiles on
the live wall) and DASHBOARD_WALL_LINGER_S (how long an ended conversation stays on it). The data
logic lives in `supportsim.live.views`; this script is wiring and layout. Model text is only
ever shown with `st.text`, in tables, or escaped for markdown, never as HTML.
"""

from __future__ import annotations

import sys
from pathlib import Path

import altair as alt
import pandas as pd
import redis
import streamlit as st
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

from supportsim.contract.live_view import Conversation
from supportsim.live.frames import role_sentiment
from supportsim.live.store import DashboardSettings, DashboardStore, Snapshot
from supportsim.live.views import (
    START_HINT,
    Headline,
    Tile,
    breakdown,
    conversations_csv,
    end_reasons,
    ending,
    escape_markdown,
    filter_conversations,
    filter_options,
    headline,
    persona_labels,
    sentiment_trend,
    transcript,
    wall_ranking,
    wall_slots,
    wall_tile,
)
from supportsim.logs import redacted  # noqa: E402

AVATARS = {"customer": ":material/person:", "agent": ":material/support_agent:"}
# "user" and "assistant" get Streamlit's distinct preset styling; avatars tell them apart too
CHAT_NAMES = {"customer": "user", "agent": "assistant"}
BADGES = {
    "positive": ("green", ":material/sentiment_satisfied:"),
    "neutral": ("gray", ":material/sentiment_neutral:"),
    "negative": ("red", ":material/sentiment_dissatisfied:"),
}
ENDINGS = {"resolved": "green", "unresolved": "orange", "gave_up": "red", "error": "red"}
WALL_COLUMNS = 4  # tiles per row of the wall
TABLE_COLUMNS = {
    "status": st.column_config.TextColumn("Status", width="small"),
    "customer": st.column_config.TextColumn("Customer"),
    "mood": st.column_config.TextColumn("Mood"),
    "product": st.column_config.TextColumn("Product"),
    "agent": st.column_config.TextColumn("Agent"),
    "turns": st.column_config.NumberColumn("Turns", format="%d"),
    "customer_first": st.column_config.NumberColumn("Customer at start", format="%+.2f"),
    "customer_now": st.column_config.NumberColumn("Customer now", format="%+.2f"),
    "sentiment_trend": st.column_config.LineChartColumn("Sentiment trend", y_min=-1, y_max=1),
    "agent_now": st.column_config.NumberColumn("Agent now", format="%+.2f"),
    "outcome": st.column_config.TextColumn("Outcome"),
    "end_reason": st.column_config.TextColumn("End reason"),
    "wants": st.column_config.TextColumn("Customer wants"),
    "updated": st.column_config.DatetimeColumn("Updated (UTC)", format="HH:mm:ss"),
    "duration_s": st.column_config.NumberColumn("Duration (s)", format="%.0f"),
    "completion_tokens": st.column_config.NumberColumn("Tokens", format="%d"),
    "conversation_id": st.column_config.TextColumn("Conversation id"),
}

st.set_page_config(page_title="SupportSim live", page_icon=":material/forum:", layout="wide")

try:
    settings = DashboardSettings()
except ValidationError as exc:
    st.error("The dashboard's environment settings are invalid:")
    st.text(str(exc))
    st.stop()

REDIS_URL = settings.redis_url.get_secret_value()
PREFIX = settings.redis_key_prefix
MAX_ENDED = settings.dashboard_max_ended
WALL_SIZE = settings.dashboard_wall_size
WALL_LINGER_MS = settings.dashboard_wall_linger_s * 1000
CACHE_TTL_S = max(0.5, min(1.0, settings.dashboard_refresh_s / 2 or 1.0))


@st.cache_resource(show_spinner=False)
def get_store(redis_url: str, prefix: str, max_ended: int) -> DashboardStore:
    """One store (Redis connection pool and row cache) per process, shared by sessions."""
    return DashboardStore.from_settings(
        DashboardSettings(
            redis_url=redis_url, redis_key_prefix=prefix, dashboard_max_ended=max_ended
        )
    )


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, max_entries=8)
def load_snapshot(redis_url: str, prefix: str, max_ended: int) -> Snapshot:
    """Fleet, series and conversation table, shared by sessions for a moment."""
    return get_store(redis_url, prefix, max_ended).snapshot()


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, max_entries=64)
def load_conversation(
    redis_url: str, prefix: str, max_ended: int, conversation_id: str
) -> Conversation | None:
    """One conversation's document (None when missing)."""
    return get_store(redis_url, prefix, max_ended).conversation(conversation_id)


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False, max_entries=64)
def load_conversations(
    redis_url: str, prefix: str, max_ended: int, conversation_ids: tuple[str, ...]
) -> dict[str, Conversation]:
    """The documents of the wall's conversations, by id, in one round trip."""
    return get_store(redis_url, prefix, max_ended).conversations(conversation_ids)


def signed(value: float | None) -> str:
    """A sentiment score as +0.00, or a dash when unknown."""
    return "–" if value is None else f"{value:+.2f}"


def score_color(value: float | None) -> str:
    """Badge colour of a sentiment score."""
    if value is None:
        return "gray"
    return "green" if value > 0.25 else "red" if value < -0.25 else "gray"


def show_pipeline_warning(figures: Headline) -> None:
    """Say so when sentiment scoring runs behind the chat (a backlog, not a pause)."""
    if not figures.behind:
        return
    seconds = f", {figures.behind_s:,.0f} s of chat" if figures.behind_s is not None else ""
    st.warning(
        f"Sentiment scoring is behind the chat: {figures.behind_messages or 0:,} messages "
        f"waiting{seconds}. Sentiment figures and transcripts lag by that much; message rates "
        "count what the bots wrote.",
        icon=":material/hourglass_top:",
    )


def bucket_text(bucket_ms: int) -> str:
    """A series bucket's length as the labels say it: "10 s"."""
    return f"{bucket_ms / 1000:g} s"


def show_headline(figures: Headline, series: pd.DataFrame, bucket_ms: int) -> None:
    """The headline metrics in one row, customer sentiment first, with pipeline health."""
    recent = series.tail(30)

    def number(value: float | None, pattern: str) -> str:
        return "–" if value is None else pattern.format(value)

    cells = st.columns([0.8, 0.8, 0.9, 1.6, 1, 1, 1.3, 1.2])
    cells[0].metric("Active", f"{figures.active:,}", border=True, height="stretch")
    cells[1].metric("Finished", f"{figures.ended:,}", border=True, height="stretch")
    cells[2].metric("Messages", f"{figures.messages:,}", border=True, height="stretch")
    with cells[3]:
        st.metric(
            "Customer sentiment",
            signed(figures.customer_now),
            help="Customers only: the mean of each active conversation's latest customer "
            "message, from -1 (negative) to +1. The sparkline is customer messages per "
            f"{bucket_text(bucket_ms)}.",
            chart_data=recent["customer_sentiment_avg"].dropna().tolist() or None,
            border=True,
            height="stretch",
        )
        st.caption(f"Agent {signed(figures.agent_now)}", help="The agents' latest messages.")
    cells[4].metric(
        "Msgs / min",
        number(figures.messages_per_minute, "{:.1f}"),
        help=(
            "Messages the bots wrote in the last minute (chat topic, by message time), "
            "scored or not."
            if figures.rates_from_chat
            else f"Scored messages in the last minute of {bucket_text(bucket_ms)} buckets."
        ),
        chart_data=recent["chat_messages" if figures.rates_from_chat else "messages"].tolist()
        or None,
        chart_type="bar",
        border=True,
        height="stretch",
    )
    cells[5].metric(
        "Tokens / s",
        number(figures.tokens_per_second, "{:.1f}"),
        help="Completion tokens generated per second over the last minute.",
        border=True,
        height="stretch",
    )
    with cells[6]:
        st.metric(
            "Scoring behind",
            "–" if figures.behind_messages is None else f"{figures.behind_messages:,}",
            help="Chat messages the bots wrote that are not scored for sentiment yet "
            "(read by the aggregator from the chat topic).",
            border=True,
            height="stretch",
        )
        if figures.behind_s is not None:
            st.caption(f"{figures.behind_s:,.1f} s of chat behind")
    with cells[7]:
        st.metric(
            "Dead letters",
            "–" if figures.dead_letters_recent is None else f"{figures.dead_letters_recent:,}",
            help="Records sent to the dead-letter topic in the last 5 minutes.",
            border=True,
            height="stretch",
        )
        if figures.dead_letters is not None:
            st.caption(f"last 5 min; {figures.dead_letters:,} in all")


def sentiment_badge(label: str | None, score: float | None) -> None:
    """A message's sentiment as a coloured badge ("not scored" before the scorer saw it)."""
    if not label:
        st.badge("not scored", color="gray")
        return
    color, icon = BADGES[label]
    shown = "" if score is None else f" {score:+.2f}"
    st.badge(f"{label}{shown}", color=color, icon=icon)


def open_conversation(conversation_id: str) -> None:
    """Open one conversation's transcript below: clear the filters that could hide it."""
    for key in ("mood", "product", "status"):
        st.session_state[key] = []
    st.session_state["search"] = ""
    st.session_state["conversation"] = conversation_id


def show_tile(tile: Tile, slot: int) -> None:
    """One wall tile: persona, card, customer sentiment from start to now, the latest bubbles."""
    st.markdown(
        f"**{escape_markdown(tile.customer)}** · {escape_markdown(tile.mood or '?')} · "
        f"{escape_markdown(tile.product or '?')}"
    )
    if tile.wants:
        st.caption(escape_markdown(f"Wants: {tile.wants}"))
    with st.container(horizontal=True, gap="small"):
        if tile.status == "ended":
            color = ENDINGS.get(tile.ending or "", "gray")
            st.badge(escape_markdown(f"ended: {tile.ending}"), color=color, icon=":material/flag:")
        else:
            st.badge("live", color="blue", icon=":material/forum:")
        st.badge(
            f"customer {signed(tile.customer_first)} → {signed(tile.customer_now)}",
            color=score_color(tile.customer_now),
        )
        if tile.remedy:
            st.badge(escape_markdown(f"offered: {tile.remedy}"), color="violet")
    with st.container(height=330, border=False):
        if not tile.messages:
            st.caption("No messages stored yet.")
        for message in tile.messages:
            with st.chat_message(
                CHAT_NAMES.get(message.role, "other"),
                avatar=AVATARS.get(message.role, ":material/help:"),
            ):
                sentiment_badge(message.label, message.score)
                st.text(message.text)
    st.caption(
        escape_markdown(
            f"{tile.agent} for the agent · {tile.turns} turns · {tile.conversation_id[:8]}"
        )
    )
    st.button(
        "Open transcript",
        key=f"open-{slot}",
        on_click=open_conversation,
        args=(tile.conversation_id,),
        icon=":material/open_in_full:",
        width="stretch",
    )


def show_wall(snapshot: Snapshot) -> None:
    """The most recently active conversations side by side, each tile updating in place."""
    if WALL_SIZE == 0:
        return
    st.subheader("Live conversations")
    ranking = wall_ranking(snapshot.conversations, WALL_LINGER_MS)
    slots = wall_slots(st.session_state.get("wall_slots", []), ranking, WALL_SIZE)
    st.session_state["wall_slots"] = slots
    shown = tuple(cid for cid in slots if cid)
    if not shown:
        st.caption("No conversation is active right now.")
        return
    documents = load_conversations(REDIS_URL, PREFIX, MAX_ENDED, shown)
    for row in range(0, len(slots), WALL_COLUMNS):
        cells = st.columns(WALL_COLUMNS)
        for offset, cell in enumerate(cells):
            slot = row + offset
            if slot >= len(slots):
                break
            cid = slots[slot]
            if cid is None or cid not in documents:
                continue  # an empty slot keeps its place for the next conversation
            with cell, st.container(border=True, key=f"wall-{slot}"):
                show_tile(wall_tile(documents[cid]), slot)


def sentiment_over_time(series: pd.DataFrame, bucket_ms: int) -> alt.LayerChart:
    """Customer sentiment per bucket (bold line), the agents' (thin), over volume."""
    base = alt.Chart(series).encode(
        alt.X("time:T", title="UTC", scale=alt.Scale(type="utc"), axis=alt.Axis(format="%H:%M"))
    )
    volume = "chat_messages" if series["chat_messages"].sum() > 0 else "messages"
    bars = base.mark_bar(opacity=0.25, color="#888").encode(
        alt.Y(
            f"{volume}:Q",
            title=f"Messages per {bucket_text(bucket_ms)}",
            axis=alt.Axis(orient="right"),
        )
    )
    long = series.melt(
        id_vars=["time"],
        value_vars=["customer_sentiment_avg", "agent_sentiment_avg"],
        var_name="who",
        value_name="sentiment",
    ).dropna(subset=["sentiment"])
    long["who"] = long["who"].map(
        {"customer_sentiment_avg": "customers", "agent_sentiment_avg": "agents"}
    )
    if long.empty:  # an aggregator that does not split by role: all messages
        long = series[["time", "sentiment_avg"]].rename(columns={"sentiment_avg": "sentiment"})
        long["who"] = "all messages"
    lines = (
        alt.Chart(long)
        .mark_line(point=True)
        .encode(
            alt.X("time:T", scale=alt.Scale(type="utc")),
            alt.Y("sentiment:Q", title="Sentiment", scale=alt.Scale(domain=[-1, 1])),
            alt.Color(
                "who:N",
                title=None,
                scale=alt.Scale(
                    domain=["customers", "agents", "all messages"],
                    range=["#e4572e", "#9ab", "#1f77b4"],
                ),
                legend=alt.Legend(orient="top"),
            ),
            alt.StrokeWidth(
                "who:N",
                scale=alt.Scale(domain=["customers", "agents", "all messages"], range=[3, 1, 2]),
                legend=None,
            ),
            tooltip=[
                alt.Tooltip("time:T", format="%H:%M:%S", formatType="utc", title="UTC"),
                alt.Tooltip("who:N", title="Who"),
                alt.Tooltip("sentiment:Q", format="+.2f", title="Sentiment"),
            ],
        )
    )
    return alt.layer(bars, lines).resolve_scale(y="independent").properties(height=260)


def sentiment_by(frame: pd.DataFrame, by: str) -> alt.Chart:
    """Average customer sentiment per mood or product, coloured from red to green."""
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            alt.X("sentiment_avg:Q", title="Customer sentiment", scale=alt.Scale(domain=[-1, 1])),
            alt.Y(f"{by}:N", title=None, sort="-x"),
            alt.Color(
                "sentiment_avg:Q",
                scale=alt.Scale(scheme="redyellowgreen", domain=[-1, 1]),
                legend=None,
            ),
            tooltip=[
                alt.Tooltip(f"{by}:N"),
                alt.Tooltip("sentiment_avg:Q", format="+.2f", title="Customer sentiment"),
                alt.Tooltip("conversations:Q"),
                alt.Tooltip("messages:Q", title="Customer messages"),
            ],
        )
        .properties(height=alt.Step(30))
    )


def conversation_trend(trend: pd.DataFrame) -> alt.LayerChart:
    """One conversation's sentiment per turn: a line through all turns, points per speaker."""
    base = alt.Chart(trend).encode(
        alt.X("turn:Q", title="Turn", axis=alt.Axis(tickMinStep=1, format="d")),
        alt.Y("score:Q", title="Sentiment", scale=alt.Scale(domain=[-1, 1])),
    )
    points = base.mark_circle(size=80).encode(
        alt.Color(
            "role:N",
            title=None,
            scale=alt.Scale(domain=["customer", "agent"], range=["#e4572e", "#1f77b4"]),
        ),
        tooltip=["turn", "role", "label", alt.Tooltip("score:Q", format="+.2f")],
    )
    line = base.mark_line(color="#bbb")
    return alt.layer(line, points).properties(height=200)


def show_fleet(snapshot: Snapshot) -> None:
    """Customer sentiment over time for the whole fleet, and by customer mood and product."""
    left, middle, right = st.columns([2, 1, 1])
    with left:
        st.subheader("Sentiment over time")
        if snapshot.series.empty:
            st.caption("No sentiment series yet.")
        else:
            st.altair_chart(
                sentiment_over_time(snapshot.series, snapshot.bucket_ms), width="stretch"
            )
    for column, by, title in ((middle, "mood", "By mood"), (right, "product", "By product")):
        with column:
            st.subheader(title, help="Average sentiment of customer messages.")
            frame = breakdown(snapshot.fleet, snapshot.conversations, by).dropna(
                subset=["sentiment_avg"]
            )
            if frame.empty:
                st.caption("No scored messages yet.")
            else:
                st.altair_chart(sentiment_by(frame, by), width="stretch")


def show_conversations(snapshot: Snapshot) -> str | None:
    """Filters, the conversations table, its CSV download and a picker; returns the pick."""
    table = snapshot.conversations
    st.subheader("Conversations")
    mood_col, product_col, status_col, search_col = st.columns([1, 1, 1, 2])
    moods = mood_col.multiselect(
        "Mood", filter_options(table, snapshot.fleet, "mood"), key="mood", placeholder="All"
    )
    products = product_col.multiselect(
        "Product",
        filter_options(table, snapshot.fleet, "product"),
        key="product",
        placeholder="All",
    )
    statuses = status_col.multiselect(
        "Status", ["active", "ended"], key="status", placeholder="All"
    )
    search = search_col.text_input(
        "Search", key="search", placeholder="customer, agent, product or id"
    )
    view = filter_conversations(
        table, moods=moods, products=products, statuses=statuses, search=search
    )
    notes = [f"{len(view):,} of {len(table):,} conversations shown"]
    listed_ended = int((table["status"] == "ended").sum())
    if snapshot.ended_total > listed_ended:
        notes.append(f"the newest {listed_ended:,} of {snapshot.ended_total:,} finished listed")
    if snapshot.unreadable:
        notes.append(f"{snapshot.unreadable} could not be read")
    st.caption("; ".join(notes) + ".")
    reasons = end_reasons(snapshot.fleet, table)
    if reasons:
        st.caption(
            "Finished by reason: "
            + escape_markdown(", ".join(f"{reason} {count:,}" for reason, count in reasons.items()))
        )
    st.dataframe(
        view[list(TABLE_COLUMNS)],
        column_config=TABLE_COLUMNS,
        hide_index=True,
        width="stretch",
        height=min(420, 38 + 35 * max(len(view), 1)),
    )
    st.download_button(
        "Download these conversations (CSV)",
        # Built on every refresh (about 25 ms for 1,200 rows) and served as a plain link. A
        # callable would be built on click, but its id is replaced by each live refresh, and
        # a click that races a refresh can then fetch nothing.
        data=conversations_csv(view),
        file_name="conversations.csv",
        mime="text/csv",
        icon=":material/download:",
        on_click="ignore",
        key="csv",
    )
    if view.empty:
        st.caption("No conversation matches the filters.")
        return None
    labels = persona_labels(view)
    return st.selectbox(
        "Open a conversation",
        list(labels),
        format_func=labels.__getitem__,
        key="conversation",
    )


def show_transcript(conversation_id: str) -> None:
    """One conversation: persona, figures, sentiment per turn and the whole stored transcript."""
    document = load_conversation(REDIS_URL, PREFIX, MAX_ENDED, conversation_id)
    if document is None:
        st.warning("This conversation is no longer in Redis.")
        return
    messages = transcript(document)
    customer, agent = document.customer, document.agent
    st.markdown(
        "**Customer** "
        + escape_markdown(
            f"{customer.name or '?'}, {customer.mood or '?'}, about their {customer.product or '?'}"
        )
        + " · **Agent** "
        + escape_markdown(f"{agent.name or '?'} ({document.model or '?'})")
    )
    card = document.card or {}
    if card:
        facts = []
        for key, value in card.items():
            for name, fact in value.items() if isinstance(value, dict) else [(key, value)]:
                if isinstance(fact, str | int | float) and not isinstance(fact, bool):
                    facts.append(f"{name}: {fact}")
        st.caption("Scenario card · " + escape_markdown("; ".join(facts)))
    trend = sentiment_trend(document)
    figures, chart = st.columns([1, 2])
    with figures:
        finish = ending(document)
        st.metric("Status", f"ended: {finish}" if finish else "active")
        st.metric("Turns so far", document.messages or len(messages))
        first, now = role_sentiment(document, "customer")
        st.metric(
            "Customer now",
            signed(now),
            delta=None if first is None or now is None else f"{now - first:+.2f} since the start",
            help=f"Customer at the start {signed(first)}, now {signed(now)}; "
            f"agent now {signed(role_sentiment(document, 'agent')[1])}.",
        )
    with chart:
        if not trend.empty:
            st.altair_chart(conversation_trend(trend), width="stretch")
    if document.messages > len(messages):
        st.caption(f"Showing the last {len(messages)} of {document.messages} messages.")
    if not messages:
        st.caption("No messages stored yet.")
    with st.container(height=560 if len(messages) > 4 else "content", border=True):
        for message in messages:
            with st.chat_message(
                CHAT_NAMES.get(message.role, "other"),
                avatar=AVATARS.get(message.role, ":material/help:"),
            ):
                when = message.time.strftime("%H:%M:%S") if message.time else "?"
                st.caption(escape_markdown(f"{message.speaker} · turn {message.turn} · {when}"))
                sentiment_badge(message.label, message.score)
                if message.remedy:
                    st.badge(escape_markdown(f"offered: {message.remedy}"), color="violet")
                st.text(message.text)


def live_view() -> None:
    """Everything that refreshes: read one snapshot, then draw it."""
    try:
        snapshot = load_snapshot(REDIS_URL, PREFIX, MAX_ENDED)
    except (redis.RedisError, OSError) as exc:
        st.error(
            escape_markdown(f"Cannot read Redis at {redacted(REDIS_URL)}: {exc}")
            + "  \nRetrying on the next refresh."
        )
        st.info(START_HINT, icon=":material/power_settings_new:")
        return
    if snapshot.empty:
        st.info(START_HINT, icon=":material/hourglass_empty:")
        return
    figures = headline(snapshot)
    show_pipeline_warning(figures)
    show_headline(figures, snapshot.series, snapshot.bucket_ms)
    show_wall(snapshot)
    show_fleet(snapshot)
    selected = show_conversations(snapshot)
    if selected:
        st.subheader("Transcript")
        with st.container(key="transcript"):
            show_transcript(selected)


st.title("Support conversations, live")
with st.sidebar:
    st.header("Settings")
    st.text(f"Redis: {redacted(REDIS_URL)}\nKey prefix: {PREFIX}")
    refresh = settings.dashboard_refresh_s
    live = st.toggle(
        "Live refresh",
        value=refresh > 0,
        disabled=refresh == 0,
        help="Every DASHBOARD_REFRESH_S seconds; turn off to read a transcript at rest.",
    )
    st.caption(f"Refresh every {refresh:g} s." if refresh else "Live refresh is off.")
    st.caption(
        f"Live wall: {WALL_SIZE} conversations; an ended one stays "
        f"{settings.dashboard_wall_linger_s:g} s of chat time."
        if WALL_SIZE
        else "Live wall off (DASHBOARD_WALL_SIZE=0)."
    )

st.fragment(live_view, run_every=refresh if live and refresh else None)()
