"""Aggregation logic of the Redis aggregator: conversations, fleet totals, the sentiment series."""

import random

import orjson
import pytest

from supportsim.contract.live_view import encode
from supportsim.contract.messages import new_id
from supportsim.contract.redis_keys import RedisKeys
from supportsim.sinks.live_folds import (
    Folded,
    Limits,
    Reject,
    Skip,
    dead_letter_time,
    empty_pipeline,
    ended_marker,
    fleet_view,
    fold_chat,
    fold_contribution,
    fold_dead_letter,
    fold_message,
    forget_old_pipeline,
    pipeline_view,
    series_view,
)
from supportsim.sinks.live_view import AggregatorSettings, RedisSink
from tests.support import chat_message, scored_message

LIMITS = Limits(recent_messages=3, retention_ms=60_000, bucket_ms=10_000, buckets=4, sentiments=5)
T0 = 1_800_000_000_000  # a whole number of buckets


def about(value: float):
    """Averages are rounded to six decimals."""
    return pytest.approx(value, abs=1e-6)


def scored(conversation_id: str, turn: int, score: float = 0.5, **overrides) -> dict:
    """A valid scored message as the aggregator receives it, a second apart per turn."""
    return scored_message(
        conversation_id, turn, score, **{"timestamp_ms": T0 + turn * 1000, **overrides}
    )


def fold_all(messages: list[dict], limits: Limits = LIMITS) -> tuple[dict, list[dict]]:
    """Fold messages of one conversation; return the aggregate and the contributions."""
    aggregate = None
    contributions = []
    for message in messages:
        folded = fold_message(aggregate, message, limits)
        assert isinstance(folded, Folded), folded
        aggregate = folded.conversation
        contributions.append(folded.contribution)
    return aggregate, contributions


def test_a_conversation_aggregate_counts_averages_and_keeps_recent_messages_in_order():
    cid = new_id()
    scores = [0.5, -1.0, 0.25, 1.0]
    messages = [
        scored(cid, turn, score, latency_ms=100 * (turn + 1), prompt_tokens=10 + turn)
        for turn, score in enumerate(scores)
    ]
    aggregate, contributions = fold_all(messages)
    assert aggregate["status"] == "active" and aggregate["end_reason"] is None
    assert aggregate["messages"] == 4 and aggregate["last_turn"] == 3
    assert aggregate["sentiment_avg"] == about(sum(scores) / 4)
    assert aggregate["sentiment_last"] == 1.0
    assert aggregate["latency_ms_avg"] == 250.0
    assert aggregate["prompt_tokens"] == 10 + 11 + 12 + 13
    assert aggregate["completion_tokens"] == 4 * 5
    assert aggregate["started_ms"] == T0 and aggregate["updated_ms"] == T0 + 3000
    assert aggregate["ended_ms"] is None
    assert aggregate["customer"] == {"name": "Dana", "mood": "angry", "product": "laptop"}
    assert aggregate["agent"] == {"name": "Sam"}
    assert [s["turn"] for s in aggregate["sentiments"]] == [0, 1, 2, 3]
    assert aggregate["sentiments"][1] == {
        "turn": 1,
        "role": "agent",
        "label": "negative",
        "score": -1.0,
    }
    # bounded: the latest three, oldest first, with their text
    assert [m["turn"] for m in aggregate["recent"]] == [1, 2, 3]
    assert aggregate["recent"][-1]["message_id"] == messages[-1]["message_id"]
    assert aggregate["recent"][-1]["text"] == "message 3"
    assert [c["started"] for c in contributions] == [True, False, False, False]
    assert contributions[-1]["conversation_messages"] == 4


def test_sentiments_are_capped_to_the_latest():
    cid = new_id()
    aggregate, _ = fold_all([scored(cid, turn) for turn in range(8)])
    assert [s["turn"] for s in aggregate["sentiments"]] == [3, 4, 5, 6, 7]
    assert aggregate["messages"] == 8


def test_the_final_message_ends_the_conversation_and_later_turns_are_rejected():
    cid = new_id()
    aggregate, contributions = fold_all(
        [scored(cid, 0), scored(cid, 1, final=True, end_reason="goodbye")]
    )
    assert aggregate["status"] == "ended"
    assert aggregate["end_reason"] == "goodbye"
    assert aggregate["ended_ms"] == T0 + 1000
    assert contributions[-1]["ended"] and contributions[-1]["end_reason"] == "goodbye"
    late = fold_message(ended_marker(aggregate), scored(cid, 2), LIMITS)
    assert isinstance(late, Reject) and "ended at turn 1" in late.reason
    again = fold_message(ended_marker(aggregate), scored(cid, 1), LIMITS)
    assert isinstance(again, Skip) and "ended at turn 1" in again.reason


def test_an_unknown_conversation_or_a_gap_beyond_the_limit_is_rejected():
    cid = new_id()
    stranger = fold_message(None, scored(cid, 5), LIMITS)
    assert isinstance(stranger, Reject) and "unknown conversation" in stranger.reason
    aggregate, _ = fold_all([scored(cid, 0), scored(cid, 1)])
    before = encode(aggregate)
    far = 2 + LIMITS.max_turn_gap + 1
    gap = fold_message(aggregate, scored(cid, far), LIMITS)
    assert isinstance(gap, Reject) and f"out-of-order turn {far}: expected turn 2" in gap.reason
    assert encode(aggregate) == before


def test_a_turn_dead_lettered_upstream_does_not_take_the_rest_of_its_conversation():
    cid = new_id()
    # turn 2 never arrives (the sentiment service dead-lettered it): 3, 4 and the end still count
    aggregate, contributions = fold_all(
        [scored(cid, 0), scored(cid, 1), scored(cid, 3), scored(cid, 4, final=True)]
    )
    assert aggregate["messages"] == 4 and aggregate["last_turn"] == 4
    assert aggregate["missing_turns"] == 1
    assert aggregate["status"] == "ended" and contributions[-1]["ended"]


def test_duplicates_and_older_turns_are_skipped_without_changing_anything():
    cid = new_id()
    first, second = scored(cid, 0), scored(cid, 1)
    aggregate, _ = fold_all([first, second])
    before = encode(aggregate)
    duplicate = fold_message(aggregate, second, LIMITS)
    assert isinstance(duplicate, Skip) and duplicate.reason.startswith("duplicate message")
    older = fold_message(aggregate, scored(cid, 0), LIMITS)  # same turn, another message id
    assert isinstance(older, Skip) and older.reason.startswith("older turn")
    assert encode(aggregate) == before


def test_a_single_final_message_starts_and_ends_a_conversation():
    _, (contribution,) = fold_all([scored(new_id(), 0, final=True, end_reason="error")])
    fleet = fold_contribution(None, contribution, LIMITS)
    view = fleet_view(fleet, LIMITS)
    assert (view["started"], view["ended"], view["active"]) == (1, 1, 0)
    assert view["end_reasons"] == {"error": 1}
    assert view["sentiment_avg_active"] is None


def conversation_messages(cid: str, mood: str, product: str, scores: list[float], end: bool):
    """Messages of one conversation with a persona; the last one final when `end`."""
    return [
        scored(
            cid,
            turn,
            score,
            customer={"name": "N", "mood": mood, "product": product},
            final=end and turn == len(scores) - 1,
            end_reason="turn_limit" if end and turn == len(scores) - 1 else None,
        )
        for turn, score in enumerate(scores)
    ]


def test_fleet_totals_breakdowns_and_the_active_average():
    a = conversation_messages(new_id(), "angry", "laptop", [-0.5, -1.0], end=False)
    b = conversation_messages(new_id(), "calm", "laptop", [0.5, 1.0, 0.0], end=True)
    c = conversation_messages(new_id(), "angry", "phone", [0.25], end=False)
    fleet = None
    for conversation in (a, b, c):
        for contribution in fold_all(conversation)[1]:
            fleet = fold_contribution(fleet, contribution, LIMITS)
    view = fleet_view(fleet, LIMITS)
    assert (view["active"], view["ended"], view["started"], view["abandoned"]) == (2, 1, 3, 0)
    assert view["messages"] == 6
    assert view["sentiment_avg"] == about((-1.5 + 1.5 + 0.25) / 6)
    assert view["sentiment_avg_active"] == about((-0.75 + 0.25) / 2)
    assert view["prompt_tokens"] == 60 and view["completion_tokens"] == 30
    assert view["tokens_per_message"] == 15.0 and view["latency_ms_avg"] == 100.0
    assert view["end_reasons"] == {"turn_limit": 1}
    assert view["by_mood"]["angry"] == {
        "conversations": 2,
        "active": 2,
        "messages": 3,
        "sentiment_avg": about((-1.5 + 0.25) / 3),
        # customers only: turn 0 of each conversation (-0.5 and 0.25)
        "customer_messages": 2,
        "customer_sentiment_avg": about((-0.5 + 0.25) / 2),
    }
    assert view["by_mood"]["calm"]["active"] == 0
    assert view["by_product"]["laptop"]["conversations"] == 2
    assert view["by_product"]["laptop"]["messages"] == 5
    assert view["updated_ms"] == T0 + 2000


def test_the_fleet_does_not_depend_on_the_order_partitions_interleave_in():
    rng = random.Random(7)
    conversations = [
        conversation_messages(
            new_id(),
            rng.choice(["angry", "calm", "sad"]),
            rng.choice(["laptop", "phone"]),
            [rng.uniform(-1, 1) for _ in range(rng.randint(1, 6))],
            end=rng.random() < 0.5,
        )
        for _ in range(12)
    ]
    streams = [fold_all(messages)[1] for messages in conversations]

    def interleave(seed: int) -> list[dict]:
        pending = [list(s) for s in streams]
        order = random.Random(seed)
        out = []
        while any(pending):
            out.append(order.choice([p for p in pending if p]).pop(0))
        return out

    results = set()
    for seed in range(5):
        fleet = None
        for contribution in interleave(seed):
            fleet = fold_contribution(fleet, contribution, LIMITS)
        results.add((encode(fleet_view(fleet, LIMITS)), encode(series_view(fleet, LIMITS))))
    assert len(results) == 1


def test_the_series_buckets_by_message_time_and_keeps_a_bounded_window():
    cid = new_id()
    fleet = None
    # two messages in each of six buckets; only the last four buckets are kept
    messages = []
    for index in range(12):
        message = scored(cid, index, 0.5 if index % 2 else -0.5, completion_tokens=index)
        message["timestamp_ms"] = T0 + (index // 2) * 10_000 + (index % 2) * 9_999
        messages.append(message)
    for contribution in fold_all(messages)[1]:
        fleet = fold_contribution(fleet, contribution, LIMITS)
    series = series_view(fleet, LIMITS)
    assert [b["bucket_ms"] for b in series] == [T0 + i * 10_000 for i in range(2, 6)]
    assert all(b["messages"] == 2 and b["sentiment_avg"] == 0.0 for b in series)
    assert series[-1]["completion_tokens"] == 10 + 11
    assert len(fleet["series"]) <= LIMITS.buckets + 1
    # a late message for a bucket out of the window changes the totals, not the series
    late = scored(new_id(), 0)
    late["timestamp_ms"] = T0
    fleet = fold_contribution(fleet, fold_all([late])[1][0], LIMITS)
    assert series_view(fleet, LIMITS) == series
    assert fleet_view(fleet, LIMITS)["messages"] == 13


def test_a_conversation_silent_past_the_retention_is_abandoned_until_it_speaks_again():
    quiet, busy = new_id(), new_id()
    fleet = fold_contribution(None, fold_all([scored(quiet, 0)])[1][0], LIMITS)
    aggregate, contributions = fold_all([scored(busy, 0)])
    for contribution in contributions:
        fleet = fold_contribution(fleet, contribution, LIMITS)
    later = scored(busy, 1)
    later["timestamp_ms"] = T0 + LIMITS.retention_ms + 10_000
    fleet = fold_contribution(fleet, fold_message(aggregate, later, LIMITS).contribution, LIMITS)
    view = fleet_view(fleet, LIMITS)
    assert (view["active"], view["abandoned"], view["started"]) == (1, 1, 2)
    back = scored(quiet, 1)
    back["timestamp_ms"] = later["timestamp_ms"] + 1
    first, _ = fold_all([scored(quiet, 0)])
    fleet = fold_contribution(fleet, fold_message(first, back, LIMITS).contribution, LIMITS)
    view = fleet_view(fleet, LIMITS)
    assert (view["active"], view["abandoned"], view["started"]) == (2, 0, 2)


def test_values_are_encoded_with_sorted_keys_so_equal_values_are_equal_bytes():
    assert encode({"b": 1, "a": {"d": 2, "c": 3}}) == encode({"a": {"c": 3, "d": 2}, "b": 1})
    assert orjson.loads(encode({"text": 'é "q"'})) == {"text": 'é "q"'}


def test_redis_keys_follow_the_documented_schema():
    keys = RedisKeys("p:")
    assert keys.conversation("c1") == "p:conversation:c1"
    assert (keys.active, keys.ended) == ("p:conversations:active", "p:conversations:ended")
    assert (keys.fleet, keys.series) == ("p:fleet", "p:series:sentiment")
    assert keys.pipeline == "p:pipeline"


def test_settings_defaults_and_environment(monkeypatch):
    settings = AggregatorSettings()
    assert settings.redis_key_prefix == "supportsim:"
    assert settings.limits == Limits(50, 86_400_000, 10_000, 360, 1000)
    monkeypatch.setenv("CONVERSATION_RETENTION_S", "60")
    monkeypatch.setenv("SERIES_BUCKET_S", "5")
    monkeypatch.setenv("RECENT_MESSAGES", "7")
    limits = AggregatorSettings().limits
    assert (limits.retention_ms, limits.bucket_ms, limits.recent_messages) == (60_000, 5_000, 7)


def test_the_redis_retry_backoff_doubles_and_is_capped():
    class Probe(RedisSink):
        def write_values(self, batch):
            raise AssertionError("not called")

    sink = Probe("redis://127.0.0.1:1/0", RedisKeys(), LIMITS, retry_max_s=3.0)
    delays = []
    for failures in range(1, 6):
        sink._failures = failures
        delays.append(sink.retry_after())
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]


# --------------------------------------------------------------------------- by role, card, outcome


def test_customer_sentiment_is_kept_apart_from_the_agents_first_and_latest():
    cid = new_id()
    # customer -0.8, agent +0.9, customer -0.2, agent +0.7, customer +0.4
    scores = [-0.8, 0.9, -0.2, 0.7, 0.4]
    aggregate, contributions = fold_all([scored(cid, t, s) for t, s in enumerate(scores)])
    customer, agent = aggregate["roles"]["customer"], aggregate["roles"]["agent"]
    assert (customer["sentiment_first"], customer["sentiment_last"]) == (-0.8, 0.4)
    assert customer["messages"] == 3 and customer["sentiment_avg"] == about((-0.8 - 0.2 + 0.4) / 3)
    assert (agent["sentiment_first"], agent["sentiment_last"]) == (0.9, 0.7)
    assert contributions[-1]["customer_last_micro"] == 400_000
    assert contributions[-1]["agent_last_micro"] == 700_000


def test_card_remedy_and_outcome_pass_through_and_may_be_absent():
    cid = new_id()
    card = {
        "id": "c-7",
        "scenario": "broken hinge",
        "product": "laptop",
        "facts": {"order": "A-1"},
        "wants": "a free repair",
        "refuses": "store credit",
        "patience": 3,
    }
    aggregate, _ = fold_all(
        [
            scored(cid, 0, card=card),
            scored(cid, 1, remedy="repair"),
            scored(cid, 2),  # a later message without a card keeps the card
            scored(cid, 3, final=True, end_reason="goodbye", outcome="resolved"),
        ]
    )
    assert {key: aggregate["card"][key] for key in card} == card  # as the contract dumps it
    assert aggregate["remedy"] == "repair"
    assert [m.get("remedy") for m in aggregate["recent"]] == ["repair", None, None]
    assert (aggregate["outcome"], aggregate["end_reason"]) == ("resolved", "goodbye")
    plain, _ = fold_all([scored(new_id(), 0, final=True, end_reason="turn_limit")])
    assert (plain["card"], plain["remedy"], plain["outcome"]) == (None, None, None)
    # fields present as null (a contract with optional fields) count as absent
    nulls, _ = fold_all([scored(new_id(), 0, card=None, final=True, outcome=None)])
    assert (nulls["card"], nulls["outcome"]) == (None, None)


def test_a_conversation_from_older_state_gets_its_per_role_totals_from_its_sentiments():
    cid = new_id()
    aggregate, _ = fold_all([scored(cid, 0, -0.6), scored(cid, 1, 0.8)])
    for field in ("roles", "card", "outcome", "remedy"):
        del aggregate[field]  # as written before these fields existed
    folded = fold_message(aggregate, scored(cid, 2, 0.1), LIMITS)
    customer = folded.conversation["roles"]["customer"]
    assert (customer["sentiment_first"], customer["sentiment_last"], customer["messages"]) == (
        -0.6,
        0.1,
        2,
    )
    assert folded.conversation["roles"]["agent"]["messages"] == 1


def test_fleet_customer_sentiment_now_is_the_active_conversations_latest_customer_line():
    a = conversation_messages(new_id(), "angry", "laptop", [-0.8, 0.9, -0.4, 0.6], end=False)
    b = conversation_messages(new_id(), "calm", "phone", [0.2, 0.5], end=False)
    gone = conversation_messages(new_id(), "calm", "phone", [1.0, 1.0, 1.0], end=True)
    fleet = None
    for conversation in (a, b, gone):
        for contribution in fold_all(conversation)[1]:
            fleet = fold_contribution(fleet, contribution, LIMITS)
    roles = fleet_view(fleet, LIMITS)["roles"]
    assert roles["customer"]["sentiment_now"] == about((-0.4 + 0.2) / 2)  # ended one left out
    assert roles["agent"]["sentiment_now"] == about((0.6 + 0.5) / 2)
    assert roles["customer"]["messages"] == 2 + 1 + 2
    assert roles["customer"]["sentiment_avg"] == about((-0.8 - 0.4 + 0.2 + 1.0 + 1.0) / 5)
    (bucket,) = series_view(fleet, LIMITS)  # every turn within the first ten seconds
    assert (bucket["customer_messages"], bucket["messages"]) == (5, 9)
    assert bucket["customer_sentiment_avg"] == about((-0.8 - 0.4 + 0.2 + 1.0 + 1.0) / 5)
    assert bucket["agent_sentiment_avg"] == about((0.9 + 0.6 + 0.5 + 1.0) / 4)


# --------------------------------------------------------------------------- pipeline figures


def test_the_chat_is_counted_once_per_turn_as_the_scored_side_counts_it():
    pipeline = empty_pipeline()
    cid = new_id()
    messages = [chat_message(cid, turn=t, timestamp_ms=T0 + t * 1000) for t in range(4)]
    counted = [fold_chat(pipeline, m, LIMITS) for m in messages]
    assert counted == [True] * 4
    assert not fold_chat(pipeline, messages[2], LIMITS)  # a duplicate
    assert not fold_chat(pipeline, chat_message(new_id(), turn=3), LIMITS)  # unknown conversation
    far = 3 + 1 + LIMITS.max_turn_gap + 1
    assert not fold_chat(pipeline, chat_message(cid, turn=far), LIMITS)  # a gap beyond the limit
    final = chat_message(cid, turn=4, timestamp_ms=T0 + 4000, final=True)
    assert fold_chat(pipeline, final, LIMITS)
    assert not fold_chat(pipeline, chat_message(cid, turn=5), LIMITS)  # after the end
    view = pipeline_view(pipeline, LIMITS)
    assert (view["chat_messages"], view["chat_newest_ms"]) == (5, T0 + 4000)
    assert view["series"] == [
        {"bucket_ms": T0, "chat_messages": 5, "chat_completion_tokens": 25, "dead_letters": 0}
    ]


def test_dead_letters_are_counted_in_total_and_per_bucket():
    pipeline = empty_pipeline()
    for when in (T0 + 1000, T0 + 2000, T0 + 12_000):
        fold_dead_letter(pipeline, when, LIMITS)
    view = pipeline_view(pipeline, LIMITS)
    assert (view["dead_letters"], view["dead_letter_newest_ms"]) == (3, T0 + 12_000)
    assert {b["bucket_ms"]: b["dead_letters"] for b in view["series"]} == {T0: 2, T0 + 10_000: 1}
    assert dead_letter_time(b'{"timestamp_ms": 5}', 9) == 5
    assert dead_letter_time(b"not json", 9) == dead_letter_time(None, 9) == 9


def test_the_pipeline_series_keeps_a_bounded_window():
    pipeline = empty_pipeline()
    cid = new_id()
    for turn in range(8):  # one chat message every 10 s; four buckets kept
        fold_chat(pipeline, chat_message(cid, turn=turn, timestamp_ms=T0 + turn * 10_000), LIMITS)
    forget_old_pipeline(pipeline, LIMITS)
    buckets = [b["bucket_ms"] for b in pipeline_view(pipeline, LIMITS)["series"]]
    assert buckets == [T0 + i * 10_000 for i in range(4, 8)]
    assert len(pipeline["series"]) == 4
    assert pipeline_view(pipeline, LIMITS)["chat_messages"] == 8


def test_a_fleet_from_older_state_is_upgraded_in_place():
    cid = new_id()
    fleet = fold_contribution(None, fold_all([scored(cid, 0)])[1][0], LIMITS)
    del fleet["roles"]
    fleet["active"][cid] = fleet["active"][cid][:5]  # five fields, as before per-role scores
    fleet["series"] = {key: counts[:3] for key, counts in fleet["series"].items()}
    aggregate, _ = fold_all([scored(cid, 0)])
    contribution = fold_message(aggregate, scored(cid, 1), LIMITS).contribution
    fleet = fold_contribution(fleet, contribution, LIMITS)
    view = fleet_view(fleet, LIMITS)
    assert view["messages"] == 2 and view["roles"]["agent"]["messages"] == 1
    assert series_view(fleet, LIMITS)[0]["messages"] == 2
