"""Sample data for the dashboard: a believable Redis view without running the stack.

Every document is built with its model of :mod:`supportsim.contract.live_view` and returned as
the JSON data the aggregator would write (:func:`~supportsim.contract.live_view.written`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import redis

from supportsim.contract.live_view import (
    DEFAULT_BUCKET_MS,
    Agent,
    Conversation,
    Customer,
    Fleet,
    FleetGroup,
    FleetRole,
    Pipeline,
    PipelinePoint,
    RecentMessage,
    RoleTotals,
    SentimentPoint,
    SeriesPoint,
    encode,
    written,
    written_series,
)
from supportsim.contract.messages import new_id, now_ms
from supportsim.contract.redis_keys import RedisKeys
from supportsim.live.frames import conversation_frame, summarize

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
    sentiments: list[SentimentPoint] = []
    recent: list[RecentMessage] = []
    roles: dict[str, RoleTotals] = {}
    remedy = SAMPLE_REMEDIES[index % len(SAMPLE_REMEDIES)] if card else None
    last_agent = max((t for t in range(turns) if t % 2), default=None)
    for turn in range(turns):
        role = "customer" if turn % 2 == 0 else "agent"
        score = round(math.sin(index + turn) * 0.9, 3)
        label = "positive" if score > 0.25 else "negative" if score < -0.25 else "neutral"
        text = texts[turn] if texts and turn < len(texts) else f"{role} says message {turn}"
        sentiments.append(SentimentPoint(turn=turn, role=role, label=label, score=score))
        message = RecentMessage(
            message_id=new_id(),
            turn=turn,
            role=role,
            text=text,
            label=label,
            score=score,
            timestamp_ms=started + turn * 5000,
        )
        if remedy and turn == last_agent:
            message.remedy = remedy
        recent.append(message)
        totals = roles.get(role)
        if totals is None:
            totals = roles[role] = RoleTotals(
                messages=0, sentiment_sum_micro=0, sentiment_first=score
            )
        totals.messages += 1
        totals.sentiment_sum_micro += round(score * 1_000_000)
        totals.sentiment_avg = round(totals.sentiment_sum_micro / totals.messages / 1_000_000, 6)
        totals.sentiment_last = score
    updated = started + max(turns - 1, 0) * 5000
    scores = [point.score for point in sentiments if point.score is not None]
    ended = status == "ended"
    product = SAMPLE_PRODUCTS[(index // len(SAMPLE_MOODS)) % len(SAMPLE_PRODUCTS)]
    document = Conversation(
        conversation_id=new_id(),
        customer=Customer(
            name=SAMPLE_NAMES[index % len(SAMPLE_NAMES)],
            mood=SAMPLE_MOODS[index % len(SAMPLE_MOODS)],
            product=product,
        ),
        agent=Agent(name="Sam" if index % 2 else "Alex"),
        card=(
            {
                "id": f"card-{index % 40:03d}",
                "scenario": "defective product",
                "product": product,
                "facts": {"order": f"A-{1000 + index}", "bought": "three weeks ago"},
                "wants": SAMPLE_WANTS[index % len(SAMPLE_WANTS)],
                "refuses": "store credit",
                "patience": 3 + index % 4,
            }
            if card
            else None
        ),
        model="sample",
        models={"customer": "sample", "agent": "sample"},
        status=status,
        end_reason=end_reason if ended else None,
        outcome=outcome if ended else None,
        remedy=remedy if last_agent is not None else None,
        messages=turns,
        last_turn=turns - 1,
        missing_turns=0,
        sentiment_avg=round(sum(scores) / len(scores), 4) if scores else None,
        sentiment_last=scores[-1] if scores else None,
        sentiments=sentiments,
        roles=roles,
        recent=recent[-50:],
        started_ms=started,
        updated_ms=updated,
        ended_ms=updated if ended else None,
        prompt_tokens=40 * turns,
        completion_tokens=25 * turns,
        latency_ms_avg=850.0,
        sentiment_sum_micro=sum(round(score * 1_000_000) for score in scores),
        latency_ms_total=850 * turns,
    )
    return written(Conversation, document)


def sample_series(
    now: int, buckets: int = 30, messages: int = 6, *, bucket_ms: int = DEFAULT_BUCKET_MS
) -> list[dict[str, Any]]:
    """A sentiment series of `buckets` full buckets of `bucket_ms` ending before `now`.

    Half the messages are the customers'; they start low and recover.
    """
    last = now - now % bucket_ms - bucket_ms
    customers = messages // 2
    return written_series(
        [
            SeriesPoint(
                bucket_ms=last - (buckets - 1 - i) * bucket_ms,
                messages=messages,
                sentiment_avg=round(math.sin(i / 4) * 0.5, 3),
                completion_tokens=messages * 25,
                customer_messages=customers,
                customer_sentiment_avg=round(math.sin(i / 4) * 0.5 - 0.3, 3),
                agent_sentiment_avg=round(math.sin(i / 4) * 0.3 + 0.4, 3),
            )
            for i in range(buckets)
        ]
    )


def sample_pipeline(
    now: int,
    chat_messages: int,
    *,
    buckets: int = 30,
    messages: int = 6,
    dead_letters: int = 0,
    bucket_ms: int = DEFAULT_BUCKET_MS,
) -> dict[str, Any]:
    """The `pipeline` value for `chat_messages` written, the last `buckets` buckets before
    `now` holding `messages` each (the newest one bucket before `now`, as in
    :func:`sample_fleet`), and `dead_letters` in the newest bucket."""
    last = now - now % bucket_ms - bucket_ms
    pipeline = Pipeline(
        chat_messages=chat_messages,
        chat_newest_ms=now - bucket_ms,
        dead_letters=dead_letters,
        dead_letter_newest_ms=last if dead_letters else None,
        series=[
            PipelinePoint(
                bucket_ms=last - (buckets - 1 - i) * bucket_ms,
                chat_messages=messages,
                chat_completion_tokens=messages * 25,
                dead_letters=dead_letters if i == buckets - 1 else 0,
            )
            for i in range(buckets)
        ],
        series_bucket_ms=bucket_ms,
    )
    return written(Pipeline, pipeline)


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
        pipe.set(keys.conversation(cid), encode(document))
        if document.get("status") == "ended":
            pipe.zrem(keys.active, cid)
            pipe.zadd(keys.ended, {cid: document.get("ended_ms") or document["updated_ms"]})
        else:
            pipe.zadd(keys.active, {cid: document["updated_ms"]})
    if fleet is not None:
        pipe.set(keys.fleet, encode(fleet))
    if series is not None:
        pipe.set(keys.series, encode(list(series)))
    if pipeline is not None:
        pipe.set(keys.pipeline, encode(pipeline))
    pipe.execute()


def sample_fleet(
    conversations: Sequence[Mapping[str, Any]],
    now: int | None = None,
    *,
    bucket_ms: int = DEFAULT_BUCKET_MS,
) -> dict[str, Any]:
    """The fleet aggregate the aggregator would write for these conversations, its newest
    scored message one bucket before `now` (as :func:`sample_pipeline` has it)."""
    documents = [Conversation.model_validate(c) for c in conversations]
    table = conversation_frame(summarize(d) for d in documents)
    active = table[table["status"] == "active"]
    reasons: dict[str, int] = {}
    for reason in table.loc[table["status"] == "ended", "end_reason"].fillna("unknown"):
        reasons[reason] = reasons.get(reason, 0) + 1
    role_scores: dict[str, list[float]] = {"customer": [], "agent": []}
    by: dict[str, dict[str, dict[str, Any]]] = {"mood": {}, "product": {}}
    for document in documents:
        active_now = document.status != "ended"
        points = [p for p in document.sentiments if p.score is not None]
        for point in points:
            if point.role in role_scores:
                role_scores[point.role].append(point.score)
        for name, value in (
            ("mood", document.customer.mood),
            ("product", document.customer.product),
        ):
            group = by[name].setdefault(
                value,
                {"conversations": 0, "active": 0, "messages": 0, "all": [], "customer": []},
            )
            group["conversations"] += 1
            group["active"] += active_now
            group["messages"] += len(points)
            group["all"] += [p.score for p in points]
            group["customer"] += [p.score for p in points if p.role == "customer"]

    def average(values: Sequence[float]) -> float | None:
        return round(sum(values) / len(values), 6) if len(values) else None

    def groups(name: str) -> dict[str, FleetGroup]:
        return {
            value: FleetGroup(
                conversations=g["conversations"],
                active=g["active"],
                messages=g["messages"],
                sentiment_avg=average(g["all"]),
                customer_messages=len(g["customer"]),
                customer_sentiment_avg=average(g["customer"]),
            )
            for value, g in by[name].items()
        }

    messages = int(table["turns"].sum())
    completion = int(table["completion_tokens"].sum())
    newest = now if now is not None else now_ms()
    fleet = Fleet(
        active=len(active),
        ended=len(table) - len(active),
        started=len(table),
        abandoned=0,
        messages=messages,
        prompt_tokens=int(table["prompt_tokens"].sum()),
        completion_tokens=completion,
        sentiment_avg_active=average(active["sentiment_avg"].dropna().tolist()),
        sentiment_avg=average(role_scores["customer"] + role_scores["agent"]),
        latency_ms_avg=850.0,
        tokens_per_message=completion / messages if messages else None,
        completion_tokens_per_message=completion / messages if messages else None,
        end_reasons=reasons,
        by_mood=groups("mood"),
        by_product=groups("product"),
        roles={
            role: FleetRole(
                messages=len(role_scores[role]),
                sentiment_avg=average(role_scores[role]),
                sentiment_now=average(active[f"{role}_now"].dropna().tolist()),
                sentiment_now_conversations=int(active[f"{role}_now"].notna().sum()),
            )
            for role in ("customer", "agent")
        },
        updated_ms=newest - bucket_ms,
        series_bucket_ms=bucket_ms,
    )
    return written(Fleet, fleet)


def dashboard_argv(port: int, address: str = "127.0.0.1", python: str | None = None) -> list[str]:
    """The command line that serves the dashboard on `address:port` (no browser, no telemetry)."""
    script = Path(__file__).resolve().parents[2] / "dashboard" / "main.py"
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
