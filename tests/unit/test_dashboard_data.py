"""Unit tests of the dashboard's data shaping (no Redis, no Streamlit)."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

import pandas as pd
import pytest

from supportsim.contract.live_view import (
    DEFAULT_BUCKET_MS,
    Conversation,
    Fleet,
    Pipeline,
    read,
    series_points,
)
from supportsim.contract.redis_keys import RedisKeys
from supportsim.live.frames import (
    CONVERSATION_COLUMNS,
    conversation_frame,
    ms_to_datetime,
    series_frame,
    summarize,
)
from supportsim.live.sample import (
    dashboard_argv,
    sample_conversation,
    sample_fleet,
    sample_pipeline,
    sample_series,
)
from supportsim.live.store import DashboardSettings, Snapshot
from supportsim.live.views import (
    breakdown,
    conversations_csv,
    end_reasons,
    escape_markdown,
    filter_conversations,
    filter_options,
    headline,
    persona_labels,
    recent_rates,
    sentiment_trend,
    transcript,
    wall_ranking,
    wall_slots,
    wall_tile,
)

NOW = 1_800_000_000_000  # a fixed "now", aligned to a bucket
BUCKET_MS = DEFAULT_BUCKET_MS


def conv(document: dict[str, Any]) -> Conversation:
    """A conversation document (JSON data) as the dashboard reads it."""
    return Conversation.model_validate(document)


def fleet_of(fleet: dict[str, Any]) -> Fleet:
    """A fleet document (JSON data) as the dashboard reads it."""
    return Fleet.model_validate(fleet)


def table(*documents: dict) -> pd.DataFrame:
    return conversation_frame(summarize(conv(d)) for d in documents)


def snapshot(documents=(), fleet=None, series=None, now=NOW, pipeline=None) -> Snapshot:
    frame = table(*documents)
    counts = Pipeline.model_validate(pipeline or {})
    return Snapshot(
        conversations=frame,
        fleet=fleet_of(fleet or {}),
        series=series_frame(series_points(series or []), counts),
        active_total=int((frame["status"] == "active").sum()),
        ended_total=int((frame["status"] == "ended").sum()),
        unreadable=0,
        taken_ms=now,
        pipeline=counts,
    )


# --- tolerant reading (the models themselves: tests/unit/test_live_view_documents.py)


@pytest.mark.parametrize("raw", [None, "", "{", b"\xff", "not json", "[1, 2]", "3"])
def test_a_conversation_value_that_is_not_a_json_object_reads_as_none(raw):
    assert read(Conversation, raw) is None


def test_ms_to_datetime_rejects_implausible_values():
    assert ms_to_datetime(NOW).year == 2027
    assert ms_to_datetime(-5) is None
    assert ms_to_datetime(10**20) is None
    assert ms_to_datetime("soon") is None


def test_escape_markdown_makes_every_markup_literal():
    text = "**bold** <b>x</b> :red[alert] $x$ [a](http://e.x)\n# title"
    escaped = escape_markdown(text)
    assert "\n" not in escaped
    unescaped = re.findall(r"(?<!\\)[*<>:$\[\]#()]", escaped.replace("\\\\", ""))
    assert unescaped == []
    # removing the escapes gives back the (single-line) text
    assert escaped.replace("\\", "") == " ".join(text.split())


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("DASHBOARD_REFRESH_S", "5")
    monkeypatch.setenv("REDIS_KEY_PREFIX", "x:")
    settings = DashboardSettings()
    assert settings.dashboard_refresh_s == 5
    assert settings.redis_key_prefix == "x:"
    monkeypatch.delenv("DASHBOARD_REFRESH_S")
    assert DashboardSettings().dashboard_refresh_s == 2


def test_settings_reject_a_negative_refresh(monkeypatch):
    monkeypatch.setenv("DASHBOARD_REFRESH_S", "-1")
    with pytest.raises(ValueError, match="dashboard_refresh_s"):
        DashboardSettings()


def test_keys_follow_the_aggregator_schema():
    keys = RedisKeys("p:")
    assert keys.conversation("c1") == "p:conversation:c1"
    assert (keys.active, keys.ended) == ("p:conversations:active", "p:conversations:ended")
    assert (keys.fleet, keys.series) == ("p:fleet", "p:series:sentiment")


# --- conversation rows


def test_summarize_a_complete_conversation():
    document = sample_conversation(3, turns=4, status="ended", end_reason="goodbye")
    row = summarize(conv(document))
    assert row["conversation_id"] == document["conversation_id"]
    assert (row["status"], row["end_reason"], row["turns"]) == ("ended", "goodbye", 4)
    assert row["customer"] == document["customer"]["name"]
    assert row["sentiment_trend"] == [s["score"] for s in document["sentiments"]]
    assert row["duration_s"] == 15.0
    assert row["ended"] is not None


@pytest.mark.parametrize(
    "document",
    [
        {},
        {"customer": "Dana", "agent": None, "sentiments": "x", "messages": "3"},
        {"customer": {"name": ["x"]}, "sentiments": [None, {"score": "high"}, {"score": 0.5}]},
        {"started_ms": "yesterday", "updated_ms": -1, "sentiment_avg": "good"},
    ],
)
def test_summarize_never_raises_on_malformed_documents(document):
    row = summarize(conv(document), "active")
    assert set(row) == set(CONVERSATION_COLUMNS)
    assert row["status"] == "active"
    frame = conversation_frame([row])
    assert len(frame) == 1


def test_the_listing_set_decides_the_status():
    document = sample_conversation(1)
    assert summarize(conv(document), "ended")["status"] == "ended"
    assert summarize(conv({**document, "status": "weird"}))["status"] == "active"


def test_empty_conversation_frame_has_all_columns():
    frame = conversation_frame([])
    assert list(frame.columns) == CONVERSATION_COLUMNS
    assert frame.empty


# --- series and rates


def test_series_frame_skips_bad_buckets_and_sorts():
    raw = [
        {"bucket_ms": NOW, "messages": 2, "sentiment_avg": 0.5, "completion_tokens": 10},
        "garbage",
        {"messages": 4},
        {"bucket_ms": NOW - BUCKET_MS, "messages": 1, "sentiment_avg": None},
    ]
    frame = series_frame(series_points(raw))
    assert frame["bucket_ms"].tolist() == [NOW - BUCKET_MS, NOW]
    assert frame["completion_tokens"].tolist() == [0, 10]
    assert series_frame(series_points({"not": "a list"})).empty
    # a bucket at an implausible time is skipped too
    assert series_frame(series_points([{"bucket_ms": -5, "messages": 1}])).empty


def test_rates_over_the_last_minute_of_an_old_series():
    series = series_frame(series_points(sample_series(NOW, buckets=30, messages=6)))
    per_minute, per_second = recent_rates(series, NOW)
    # the six buckets starting in the last 60 s, over 60 s
    assert per_minute == pytest.approx(6 * 6)
    assert per_second == pytest.approx(6 * 6 * 25 / 60)


def test_rates_of_a_young_series_use_its_age_not_the_whole_window():
    series = series_frame(
        series_points(
            [{"bucket_ms": NOW - 20_000, "messages": 10, "completion_tokens": 100}]
            + [{"bucket_ms": NOW - 10_000, "messages": 10, "completion_tokens": 100}]
        )
    )
    per_minute, per_second = recent_rates(series, NOW)
    assert per_minute == pytest.approx(20 * 60 / 20)
    assert per_second == pytest.approx(200 / 20)


def test_rates_are_zero_when_the_series_went_quiet_and_none_without_one():
    series = series_frame(series_points([{"bucket_ms": NOW - 600_000, "messages": 50}]))
    assert recent_rates(series, NOW) == (0.0, 0.0)
    assert recent_rates(series_frame([]), NOW) == (None, None)


def test_a_bucket_just_started_does_not_spike_the_rate():
    series = series_frame(
        series_points([{"bucket_ms": NOW - 500, "messages": 3, "completion_tokens": 30}])
    )
    per_minute, _ = recent_rates(series, NOW)
    assert per_minute == pytest.approx(3 * 6)  # over one whole bucket, not half a second


# --- headline and breakdowns


def test_headline_prefers_the_fleet_aggregate():
    docs = [sample_conversation(i) for i in range(3)] + [
        sample_conversation(9, status="ended", end_reason="turn_limit")
    ]
    fleet = {**sample_fleet(docs, NOW), "ended": 40, "messages": 1234}
    fleet["roles"] = {"customer": {"sentiment_now": -0.25}, "agent": {"sentiment_now": 0.6}}
    pipeline = sample_pipeline(NOW, 1234)
    figures = headline(snapshot(docs, fleet, sample_series(NOW), now=NOW, pipeline=pipeline))
    assert (figures.active, figures.ended, figures.messages) == (3, 40, 1234)
    assert (figures.customer_now, figures.agent_now) == (-0.25, 0.6)
    assert figures.messages_per_minute == pytest.approx(36)
    assert (figures.behind_messages, figures.behind_s, figures.dead_letters_recent) == (0, 0, 0)
    assert not figures.behind


def test_headline_sentiment_is_the_customers_not_the_agents_polite_lines():
    # customers unhappy, agents cheerful: an average over both would look fine
    docs = [sample_conversation(i, turns=4) for i in range(3)]
    for document in docs:
        for point in document["sentiments"] + document["recent"]:
            point["score"] = -0.8 if point["role"] == "customer" else 0.9
        del document["roles"]  # an older aggregator: computed from the sentiments
    figures = headline(snapshot(docs))
    assert figures.customer_now == pytest.approx(-0.8)
    assert figures.agent_now == pytest.approx(0.9)


def test_a_scoring_backlog_shows_in_the_headline_as_a_backlog_not_as_zero():
    docs = [sample_conversation(i) for i in range(2)]
    # scoring stopped ten minutes ago; the bots kept writing six messages per 10 s since
    series = [b for b in sample_series(NOW, buckets=90) if b["bucket_ms"] <= NOW - 600_000]
    fleet = sample_fleet(docs, NOW - 600_000)
    pipeline = sample_pipeline(NOW, fleet["messages"] + 3600, buckets=90, dead_letters=2)
    figures = headline(snapshot(docs, fleet, series, now=NOW, pipeline=pipeline))
    assert figures.messages_per_minute == pytest.approx(36)  # what the bots wrote
    assert figures.tokens_per_second == pytest.approx(36 * 25 / 60)
    assert (figures.behind_messages, figures.behind_s) == (3600, 600.0)
    assert figures.behind
    assert (figures.dead_letters_recent, figures.dead_letters) == (2, 2)
    # the same data without chat figures (an older aggregator) falls back to scored messages
    older = headline(snapshot(docs, fleet, series, now=NOW))
    assert older.messages_per_minute == 0.0 and older.behind_messages is None
    assert older.dead_letters_recent is None and not older.behind


def test_headline_without_fleet_or_series_computes_from_conversations():
    docs = [sample_conversation(i, turns=4) for i in range(2)]
    figures = headline(snapshot(docs))
    assert figures.messages == 8
    expected = sum(d["roles"]["customer"]["sentiment_last"] for d in docs) / 2
    assert figures.customer_now == pytest.approx(expected)
    assert figures.messages_per_minute is None and figures.tokens_per_second is None


def test_headline_of_nothing():
    figures = headline(snapshot())
    assert (figures.active, figures.ended, figures.messages, figures.customer_now) == (
        0,
        0,
        0,
        None,
    )
    assert snapshot().empty


def test_breakdown_from_fleet_and_fallback_from_rows():
    docs = [sample_conversation(i, turns=2) for i in range(10)]
    from_rows = breakdown(Fleet(), table(*docs), "mood")
    assert from_rows["conversations"].sum() == 10
    assert from_rows["messages"].sum() == 20
    fleet = {"by_mood": {"angry": {"conversations": 2, "messages": 9, "sentiment_avg": -0.4}}}
    from_fleet = breakdown(fleet_of(fleet), table(*docs), "mood")
    assert from_fleet.to_dict("records") == [
        {"mood": "angry", "conversations": 2, "messages": 9, "sentiment_avg": -0.4}
    ]
    # customer messages only, where the aggregator splits them
    fleet["by_mood"]["angry"].update(customer_messages=5, customer_sentiment_avg=-0.7)
    assert breakdown(fleet_of(fleet), table(*docs), "mood").to_dict("records") == [
        {"mood": "angry", "conversations": 2, "messages": 5, "sentiment_avg": -0.7}
    ]
    malformed = breakdown(fleet_of({"by_mood": {"x": "y"}}), table(), "mood")
    assert malformed["conversations"].tolist() == [0]
    assert breakdown(Fleet(), table(), "product").empty


# --- filters and CSV


@pytest.fixture
def mixed() -> pd.DataFrame:
    docs = [sample_conversation(i) for i in range(10)]
    docs += [sample_conversation(i, status="ended", end_reason="goodbye") for i in range(10, 14)]
    return table(*docs)


def test_filters_by_each_column_and_together(mixed):
    assert len(filter_conversations(mixed)) == 14
    angry = filter_conversations(mixed, moods=["angry"])
    assert set(angry["mood"]) == {"angry"} and len(angry) == (mixed["mood"] == "angry").sum()
    routers = filter_conversations(mixed, products=["router"])
    assert set(routers["product"]) == {"router"}
    ended = filter_conversations(mixed, statuses=["ended"])
    assert len(ended) == 4 and set(ended["end_reason"]) == {"goodbye"}
    both = filter_conversations(mixed, moods=["angry", "polite"], statuses=["active"])
    assert set(both["mood"]) <= {"angry", "polite"} and set(both["status"]) == {"active"}


def test_search_matches_names_products_and_ids(mixed):
    first_id = mixed["conversation_id"].iloc[0]
    assert filter_conversations(mixed, search=first_id[:8].upper())["conversation_id"].tolist()[
        0
    ] == (first_id)
    dana = filter_conversations(mixed, search=" dana ")
    assert len(dana) and set(dana["customer"]) == {"Dana"}
    assert filter_conversations(mixed, search="(no such thing[").empty  # not a regex


def test_filter_options_merge_table_and_fleet(mixed):
    fleet = fleet_of({"by_mood": {"zen": {}}})
    assert filter_options(mixed, fleet, "mood")[-1] == "zen"
    assert filter_options(mixed, Fleet(), "product") == sorted(set(mixed["product"]))


def test_csv_holds_the_rows_in_view(mixed):
    view = filter_conversations(mixed, statuses=["ended"])
    rows = list(csv.DictReader(io.StringIO(conversations_csv(view).decode())))
    assert [r["conversation_id"] for r in rows] == view["conversation_id"].tolist()
    assert list(rows[0]) == CONVERSATION_COLUMNS
    assert {r["end_reason"] for r in rows} == {"goodbye"}
    assert rows[0]["started"].endswith("Z") and rows[0]["started"][:2] == "20"
    assert len(rows[0]["sentiment_trend"].split()) == int(rows[0]["turns"])


def test_csv_of_nothing_is_a_header():
    assert conversations_csv(table()).decode().strip() == ",".join(CONVERSATION_COLUMNS)


def test_csv_defuses_spreadsheet_formulas():
    document = sample_conversation(0)
    document["customer"]["name"] = '=HYPERLINK("http://evil")'
    rows = list(csv.DictReader(io.StringIO(conversations_csv(table(document)).decode())))
    assert rows[0]["customer"] == "'" + document["customer"]["name"]


# --- one conversation


def test_transcript_orders_by_turn_and_names_speakers():
    document = sample_conversation(2, turns=4)
    document["recent"].reverse()
    messages = transcript(conv(document))
    assert [m.turn for m in messages] == [0, 1, 2, 3]
    assert [m.role for m in messages[:2]] == ["customer", "agent"]
    assert messages[0].speaker == document["customer"]["name"]
    assert messages[1].speaker == document["agent"]["name"]
    assert messages[0].label in ("positive", "neutral", "negative")


def test_transcript_keeps_text_exactly_and_tolerates_bad_entries():
    hostile = '<script>window.__pwned=1</script> **x** <img src=x onerror="1">'
    document = {
        "recent": [
            {"turn": 1, "role": "robot", "text": hostile, "label": "furious", "score": "bad"},
            "junk",
            {"turn": 0, "role": "customer", "text": None},
            {},
        ]
    }
    messages = transcript(conv(document))
    assert [m.turn for m in messages] == [0, 1]
    assert messages[0].speaker == "Customer" and messages[0].text == ""
    assert messages[1].role == "other" and messages[1].text == hostile
    assert messages[1].label is None and messages[1].score is None
    assert transcript(Conversation()) == []


def test_sentiment_trend_of_a_conversation():
    document = sample_conversation(1, turns=5)
    trend = sentiment_trend(conv(document))
    assert trend["turn"].tolist() == [0, 1, 2, 3, 4]
    assert trend["score"].between(-1, 1).all()
    assert sentiment_trend(conv({"sentiments": [{"turn": 1}]})).empty


def test_persona_labels_are_plain_and_unique(mixed):
    labels = persona_labels(mixed)
    assert len(labels) == len(mixed)
    ended = mixed[mixed["status"] == "ended"]["conversation_id"].iloc[0]
    assert "ended: goodbye" in labels[ended]


def test_dashboard_command_line_is_headless_and_local():
    argv = dashboard_argv(8502)
    assert argv[1:4] == ["-m", "streamlit", "run"] and argv[4].endswith("dashboard/main.py")
    flags = dict(zip(argv[5::2], argv[6::2], strict=True))
    assert flags["--server.port"] == "8502"
    assert flags["--server.address"] == "127.0.0.1"
    assert flags["--server.headless"] == "true"
    assert flags["--browser.gatherUsageStats"] == "false"


def test_end_reasons_from_fleet_or_from_the_finished_rows(mixed):
    fleet = fleet_of({"end_reasons": {"goodbye": 3, "turn_limit": 7, "error": 0, "bad": "x"}})
    assert end_reasons(fleet, mixed) == {"turn_limit": 7, "goodbye": 3}
    assert end_reasons(Fleet(), mixed) == {"goodbye": 4}
    assert end_reasons(Fleet(), table()) == {}


def test_port_and_address_settings(monkeypatch):
    assert DashboardSettings().dashboard_port is None
    monkeypatch.setenv("DASHBOARD_PORT", "8600")
    monkeypatch.setenv("DASHBOARD_ADDRESS", "0.0.0.0")
    settings = DashboardSettings()
    assert (settings.dashboard_port, settings.dashboard_address) == (8600, "0.0.0.0")


# --- the live wall


def test_the_wall_ranks_active_conversations_newest_first_and_lets_ended_ones_linger():
    active = [sample_conversation(i, started_ms=NOW - 100_000 + i * 1000) for i in range(3)]
    just_ended = sample_conversation(7, status="ended", started_ms=NOW - 60_000)
    long_ended = sample_conversation(8, status="ended", started_ms=NOW - 900_000)
    frame = table(*active, just_ended, long_ended)
    ranking = wall_ranking(frame, linger_ms=30_000)
    ids = [d["conversation_id"] for d in active]
    # just_ended spoke last of all (its final message); long_ended ended long before
    assert ranking == [just_ended["conversation_id"], ids[2], ids[1], ids[0]]
    assert long_ended["conversation_id"] not in ranking
    assert long_ended["conversation_id"] not in wall_ranking(frame, linger_ms=0)
    assert wall_ranking(table(), 30_000) == []


def test_wall_tiles_stay_put_as_turns_arrive_and_free_tiles_take_the_newest():
    assert wall_slots([], ["a", "b", "c"], 4) == ["a", "b", "c", None]
    # "c" spoke last: it is first in the ranking, but no tile moves
    assert wall_slots(["a", "b", "c", None], ["c", "d", "a", "b"], 4) == ["a", "b", "c", "d"]
    # "b" ended and lingered out: its tile takes the newest conversation not shown
    assert wall_slots(["a", "b", "c", "d"], ["e", "d", "c", "a"], 4) == ["a", "e", "c", "d"]
    # with many conversations, a tile keeps its conversation while it ranks in the top 2 x size
    ranking = [f"n{i}" for i in range(8)]
    assert wall_slots(["n5", "n3", "old"], ranking, 3) == ["n5", "n3", "n0"]
    assert wall_slots(["n6", "n3", "n0"], ranking, 3) == ["n1", "n3", "n0"]
    assert wall_slots(["x", "y"], [], 2) == [None, None]
    assert wall_slots(["a"], ["a"], 0) == []


def test_a_wall_tile_has_persona_card_customer_sentiment_and_the_latest_messages():
    document = sample_conversation(
        3, turns=9, status="ended", end_reason="goodbye", outcome="resolved"
    )
    tile = wall_tile(conv(document))
    assert (tile.customer, tile.mood, tile.product) == (
        document["customer"]["name"],
        document["customer"]["mood"],
        document["customer"]["product"],
    )
    assert tile.wants == document["card"]["wants"]
    assert (tile.status, tile.ending, tile.remedy) == ("ended", "resolved", document["remedy"])
    customer_scores = [p["score"] for p in document["sentiments"] if p["role"] == "customer"]
    assert (tile.customer_first, tile.customer_now) == (customer_scores[0], customer_scores[-1])
    assert [m.turn for m in tile.messages] == [3, 4, 5, 6, 7, 8]
    assert tile.messages[-1].text == document["recent"][-1]["text"]
    assert any(m.remedy for m in tile.messages)


def test_a_tile_without_card_or_outcome_shows_the_end_reason():
    document = sample_conversation(2, status="ended", end_reason="turn_limit", card=False)
    del document["outcome"], document["card"], document["roles"], document["remedy"]
    tile = wall_tile(conv(document))
    assert (tile.wants, tile.ending, tile.remedy) == ("", "turn_limit", None)
    assert tile.customer_first == document["sentiments"][0]["score"]
    broken = wall_tile(conv({"customer": "x", "recent": "y", "card": ["z"], "status": "ended"}))
    assert (broken.customer, broken.ending, broken.messages) == ("Customer", "unknown", [])


def test_sample_documents_have_every_field_of_the_models():
    from supportsim.contract.live_view import FleetGroup, FleetRole, RoleTotals

    document = sample_conversation(0)
    assert set(document) == set(Conversation.model_fields)
    assert set(document["roles"]["customer"]) == set(RoleTotals.model_fields)
    fleet = sample_fleet([document], NOW)
    assert set(fleet) == set(Fleet.model_fields)
    assert set(fleet["by_mood"]["angry"]) == set(FleetGroup.model_fields)
    assert set(fleet["roles"]["agent"]) == set(FleetRole.model_fields)
    assert set(sample_pipeline(NOW, 1)) == set(Pipeline.model_fields)


def test_chat_counts_join_the_series_by_bucket():
    pipeline = sample_pipeline(NOW, 100, buckets=3, messages=4, dead_letters=1)
    scored = sample_series(NOW, buckets=2)  # scoring is one bucket behind the chat
    frame = series_frame(series_points(scored), Pipeline.model_validate(pipeline))
    assert frame["bucket_ms"].tolist() == [NOW - i * BUCKET_MS for i in (3, 2, 1)]
    assert frame["chat_messages"].tolist() == [4, 4, 4]
    assert frame["messages"].tolist()[-1] == 6 and frame["dead_letters"].tolist() == [0, 0, 1]
