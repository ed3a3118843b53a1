"""The Redis documents as models (supportsim.contract.live_view): one layout for the aggregator,
the dashboard, the sample data, the oracle and docs/redis-keys.md."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest

from supportsim.contract.live_view import (
    DEFAULT_BUCKET_MS,
    Conversation,
    Fleet,
    Pipeline,
    PipelinePoint,
    RecentMessage,
    RoleTotals,
    SentimentPoint,
    SeriesPoint,
    encode,
    read,
    read_series,
    written,
)
from supportsim.contract.messages import ScoredMessage, new_id
from supportsim.live.frames import conversation_frame, series_frame, summarize
from supportsim.live.sample import sample_conversation, sample_fleet
from supportsim.live.store import Snapshot
from supportsim.live.views import headline, transcript, wall_tile
from supportsim.local.processes import REPO_ROOT
from supportsim.sinks.live_folds import (
    Folded,
    Limits,
    empty_pipeline,
    fleet_view,
    fold_chat,
    fold_contribution,
    fold_dead_letter,
    fold_message,
    pipeline_view,
    series_view,
)
from supportsim.sinks.live_view import conversation_value, fleet_values, pipeline_value
from tests.support import scored_message

T0 = 1_800_000_000_000  # a whole number of buckets (of 10 s and of 30 s)
CARD = {
    "scenario": "late delivery",
    "id": "card-7",
    "product": "laptop",
    "facts": {"order": "A-17"},
    "wants": "a refund",
    "refuses": "store credit",
    "patience": 3,
    "accepts": ["refund"],
}


def scored(cid: str, turn: int, score: float, *, step_ms: int = 1000, **overrides) -> dict:
    """A valid scored message as the aggregator receives it, `step_ms` apart per turn."""
    return scored_message(cid, turn, score, **{"timestamp_ms": T0 + turn * step_ms, **overrides})


def conversation_messages(cid: str, turns: int, *, ends: bool, step_ms: int = 1000) -> list[dict]:
    """One conversation with a card, remedies, a skipped turn and (if `ends`) an outcome."""
    messages = []
    for turn in range(turns):
        if turn == 3:
            continue  # dead-lettered upstream: counted in missing_turns
        extra: dict[str, Any] = {}
        if turn % 2 == 0:
            extra["card"] = CARD
        elif turn % 4 == 1:
            extra["remedy"] = "refund"
        if ends and turn == turns - 1:
            extra.update(final=True, end_reason="goodbye", outcome="resolved")
        score = ((turn * 37) % 21 - 10) / 10
        messages.append(scored(cid, turn, score, step_ms=step_ms, **extra))
    return messages


def fold(messages: list[dict], limits: Limits) -> tuple[dict[str, dict], dict]:
    """Fold messages in order: the conversation aggregates by id and the fleet aggregate."""
    conversations: dict[str, dict] = {}
    fleet = None
    for message in messages:
        folded = fold_message(conversations.get(message["conversation_id"]), message, limits)
        assert isinstance(folded, Folded), folded
        conversations[message["conversation_id"]] = folded.conversation
        fleet = fold_contribution(fleet, folded.contribution, limits)
    assert fleet is not None
    return conversations, fleet


def stream(limits: Limits, step_ms: int = 1000) -> list[dict]:
    ended = conversation_messages(new_id(), 7, ends=True, step_ms=step_ms)
    ongoing = conversation_messages(new_id(), 6, ends=False, step_ms=step_ms)
    plain = [scored(new_id(), 0, 0.5, step_ms=step_ms)]  # no card, no remedy, one role
    return sorted(ended + ongoing + plain, key=lambda m: (m["timestamp_ms"], m["turn"]))


# --------------------------------------------------------------------------- writing


def test_what_the_aggregator_writes_has_exactly_the_models_fields_and_round_trips():
    limits = Limits(recent_messages=3)
    conversations, fleet = fold(stream(limits), limits)
    for aggregate in conversations.values():
        assert set(aggregate) == set(Conversation.model_fields)
        for point in aggregate["sentiments"]:
            assert set(point) == set(SentimentPoint.model_fields)
        for role in aggregate["roles"].values():
            assert set(role) == set(RoleTotals.model_fields)
        for message in aggregate["recent"]:  # `remedy` only where one was offered
            assert set(RecentMessage.model_fields) - set(message) <= {"remedy"}
        # through the model: the same data, the same bytes
        assert written(Conversation, aggregate) == aggregate
        assert conversation_value(encode(aggregate)) == encode(aggregate)
    ended = next(c for c in conversations.values() if c["status"] == "ended")
    assert (ended["outcome"], ended["remedy"], ended["missing_turns"]) == ("resolved", "refund", 1)
    assert ended["card"] == CARD
    assert any("remedy" in m for m in ended["recent"])
    view = fleet_view(fleet, limits)
    assert set(view) == set(Fleet.model_fields)
    series = series_view(fleet, limits)
    assert series and all(set(point) == set(SeriesPoint.model_fields) for point in series)
    assert fleet_values(fleet, limits) == (encode(view), encode(series))
    assert view["series_bucket_ms"] == limits.bucket_ms


def test_the_pipeline_document_round_trips_through_its_model():
    limits = Limits(bucket_ms=30_000)
    pipeline = empty_pipeline()
    for message in stream(limits):
        fold_chat(pipeline, message, limits)
    fold_dead_letter(pipeline, T0 + 500, limits)
    view = pipeline_view(pipeline, limits)
    assert set(view) == set(Pipeline.model_fields)
    assert all(set(point) == set(PipelinePoint.model_fields) for point in view["series"])
    assert pipeline_value(pipeline, limits) == encode(view)
    assert read(Pipeline, encode(view)) == Pipeline.model_validate(view)
    assert view["series_bucket_ms"] == 30_000


def test_sample_documents_read_back_as_written():
    document = sample_conversation(3, turns=5, status="ended", end_reason="goodbye")
    assert written(Conversation, read(Conversation, encode(document))) == document
    fleet = sample_fleet([document], T0)
    assert written(Fleet, read(Fleet, encode(fleet))) == fleet


# --------------------------------------------------------------------------- tolerant reading


def older_document() -> dict:
    """A conversation as an early aggregator wrote it: none of the added fields."""
    document = sample_conversation(2, turns=4, status="ended", end_reason="turn_limit")
    added = ("card", "models", "outcome", "remedy", "missing_turns", "roles")
    added += ("sentiment_sum_micro", "latency_ms_total")
    for name in added:
        del document[name]
    for message in document["recent"]:
        message.pop("remedy", None)
    return document


def test_a_document_from_an_older_aggregator_still_loads_and_shows():
    document = older_document()
    conversation = read(Conversation, encode(document))
    assert conversation is not None
    assert (conversation.card, conversation.outcome, conversation.remedy) == (None, None, None)
    assert (conversation.roles, conversation.models, conversation.missing_turns) == ({}, {}, 0)
    row = summarize(conversation)
    customer = [p["score"] for p in document["sentiments"] if p["role"] == "customer"]
    assert (row["customer_first"], row["customer_now"]) == (customer[0], customer[-1])
    assert (row["turns"], row["end_reason"], row["outcome"], row["wants"]) == (
        4,
        "turn_limit",
        None,
        "",
    )
    tile = wall_tile(conversation)
    assert (tile.ending, tile.remedy, tile.status) == ("turn_limit", None, "ended")
    assert [m.text for m in transcript(conversation)] == [m["text"] for m in document["recent"]]
    # a fleet without `series_bucket_ms`: the dashboard falls back to 10 s
    fleet = sample_fleet([document], T0)
    del fleet["series_bucket_ms"]
    assert read(Fleet, encode(fleet)).series_bucket_ms is None
    assert snapshot_of(read(Fleet, encode(fleet)), [], Pipeline()).bucket_ms == DEFAULT_BUCKET_MS


@pytest.mark.parametrize(
    ("field", "junk", "default"),
    [
        ("messages", "3", 0),
        ("messages", True, 0),
        ("messages", 7.5, 0),
        ("sentiment_avg", "good", None),
        ("sentiment_avg", float("nan"), None),
        ("started_ms", "yesterday", None),
        ("status", "weird", "active"),
        ("end_reason", {"a": 1}, None),
        ("card", ["z"], None),
        ("models", "x", {}),
        ("roles", [1, 2], {}),
        ("sentiments", "x", []),
        ("recent", {"a": 1}, []),
        ("conversation_id", None, ""),
    ],
)
def test_a_value_of_the_wrong_type_falls_back_to_the_default(field, junk, default):
    document = {**sample_conversation(1), field: junk}
    conversation = Conversation.model_validate(document)
    assert getattr(conversation, field) == default
    # the rest of the document is untouched
    assert conversation.customer.name == document["customer"]["name"]


def test_bad_entries_are_left_out_or_take_their_defaults():
    conversation = Conversation.model_validate(
        {
            "customer": "Dana",
            "agent": {"name": ["x"]},
            "sentiments": [None, {"score": "high", "turn": 2}, {"score": 0.5, "label": "meh"}],
            "recent": ["junk", {"turn": 1, "text": 12, "score": float("inf")}],
            "roles": {"customer": "x", "agent": {"sentiment_last": 0.25}},
        }
    )
    assert (conversation.customer.name, conversation.agent.name) == ("", "")
    assert [(p.turn, p.score, p.label) for p in conversation.sentiments] == [
        (2, None, None),
        (-1, 0.5, None),
    ]
    (message,) = conversation.recent
    assert (message.turn, message.text, message.score) == (1, "12", None)  # text from a number
    assert conversation.roles["customer"] == RoleTotals()
    assert conversation.roles["agent"].sentiment_last == 0.25
    fleet = Fleet.model_validate(
        {"by_mood": {"x": "y"}, "end_reasons": {"a": "x"}, "series_bucket_ms": 0, "roles": 3}
    )
    assert fleet.by_mood["x"].conversations == 0 and fleet.end_reasons == {"a": 0}
    assert (fleet.series_bucket_ms, fleet.roles, fleet.messages) == (None, {}, None)
    series = read_series(orjson.dumps([{"bucket_ms": "x"}, 5, None, {"bucket_ms": T0}]))
    assert [point.bucket_ms for point in series] == [T0]
    pipeline = Pipeline.model_validate({"series": [{"chat_messages": 3}], "dead_letters": "2"})
    assert (pipeline.series, pipeline.dead_letters) == ([], None)


@pytest.mark.parametrize("raw", [None, "", "{", b"\xff", "[1]", "null", '"text"'])
def test_a_value_that_is_not_a_json_object_is_unreadable(raw):
    assert read(Conversation, raw) is None
    assert read(Fleet, raw) is None
    assert read_series(raw) == []


def test_unknown_fields_of_a_newer_aggregator_are_ignored():
    document = sample_conversation(0)
    newer = {**document, "sentiment_mood_ring": {"x": 1}}
    newer["recent"] = [{**m, "emoji": "x"} for m in document["recent"]]
    assert written(Conversation, read(Conversation, encode(newer))) == document


# --------------------------------------------------------------------------- the bucket size


def snapshot_of(fleet: Fleet, series: list[SeriesPoint], pipeline: Pipeline, now: int = T0):
    frame = conversation_frame([])
    return Snapshot(
        conversations=frame,
        fleet=fleet,
        series=series_frame(series, pipeline),
        active_total=0,
        ended_total=0,
        unreadable=0,
        taken_ms=now,
        pipeline=pipeline,
    )


@pytest.mark.parametrize("bucket_s", [10, 30])
def test_the_dashboard_rates_use_the_bucket_size_the_aggregator_wrote(bucket_s):
    limits = Limits(bucket_ms=bucket_s * 1000)
    messages = stream(limits, step_ms=100)  # 14 messages in the first two seconds
    _, fleet = fold(messages, limits)
    pipeline = empty_pipeline()
    for message in messages:
        fold_chat(pipeline, message, limits)
    fleet_raw, series_raw = fleet_values(fleet, limits)
    read_back = snapshot_of(
        read(Fleet, fleet_raw),
        read_series(series_raw),
        read(Pipeline, pipeline_value(pipeline, limits)),
        now=T0 + 5000,  # five seconds into the first bucket
    )
    assert read_back.bucket_ms == bucket_s * 1000
    figures = headline(read_back)
    # a young series counts over one whole bucket at least: 14 messages per 10 s or per 30 s
    assert figures.rates_from_chat
    assert figures.messages_per_minute == pytest.approx(len(messages) * 60 / bucket_s)
    # without the pipeline's figures, the scored series and the fleet's bucket size
    scored_only = snapshot_of(
        read(Fleet, fleet_raw), read_series(series_raw), Pipeline(), now=T0 + 5000
    )
    assert scored_only.bucket_ms == bucket_s * 1000
    assert headline(scored_only).messages_per_minute == pytest.approx(len(messages) * 60 / bucket_s)


# --------------------------------------------------------------------------- the documentation


def documented_fields() -> dict[str, set[str]]:
    """The field names in each key's table of docs/redis-keys.md."""
    text = (REPO_ROOT / "docs" / "redis-keys.md").read_text()
    fields: dict[str, set[str]] = {}
    for section in text.split("\n## ")[1:]:
        heading, _, body = section.partition("\n")
        names = set()
        for line in body.splitlines():
            if line.startswith("| `"):
                names |= set(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
        fields[heading.strip()] = names
    return fields


def test_the_documented_tables_list_exactly_the_models_fields():
    documented = documented_fields()
    assert documented["`P conversation:{conversation_id}`"] == set(Conversation.model_fields)
    assert documented["`P fleet`"] == set(Fleet.model_fields)
    assert documented["`P series:sentiment`"] == set(SeriesPoint.model_fields)
    assert documented["`P pipeline`"] == set(Pipeline.model_fields)


# --------------------------------------------------------------------------- the oracle


def test_the_oracle_checks_redis_by_the_models_fields():
    from tests.harness.oracle import _fleet_problems, _redis_problems, expected_fleet
    from tests.harness.readback import RedisState

    limits = Limits()
    messages = stream(limits)
    conversations, fleet = fold(messages, limits)
    by_id: dict[str, list[ScoredMessage]] = {}
    for message in messages:
        by_id.setdefault(message["conversation_id"], []).append(
            ScoredMessage.model_validate(message)
        )
    documents = {
        cid: orjson.loads(conversation_value(encode(c))) for cid, c in conversations.items()
    }
    state = RedisState(
        fleet=orjson.loads(fleet_values(fleet, limits)[0]),
        conversations=documents,
        active={cid for cid, c in conversations.items() if c["status"] == "active"},
        ended={cid for cid, c in conversations.items() if c["status"] == "ended"},
    )
    for cid in conversations:
        assert _redis_problems(cid, by_id[cid], state, limits.recent_messages) == []
    want = expected_fleet(by_id)
    assert _fleet_problems(want, state.fleet) == []
    # a wrong value and a missing field are named by the models' field names
    cid = next(iter(conversations))
    state.conversations[cid] = {**documents[cid], "messages": 99}
    del state.conversations[cid]["missing_turns"]
    problems = _redis_problems(cid, by_id[cid], state, limits.recent_messages)
    assert problems[0] == "Redis conversation lacks missing_turns"
    assert problems[1].startswith("Redis messages=99, expected ")
    broken = {**state.fleet, "started": 0}
    del broken["series_bucket_ms"]
    broken["by_mood"] = {}
    assert [p.split("=")[0].split(" {")[0] for p in _fleet_problems(want, broken)] == [
        "fleet lacks series_bucket_ms",
        "fleet started",
        "fleet by_mood",
    ]
