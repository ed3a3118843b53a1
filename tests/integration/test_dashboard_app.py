"""The dashboard script run by Streamlit's AppTest against real Redis, with fixture data
written under the test's own key prefix (deleted afterwards by the `redis_client` fixture).
Also the store's incremental reading, against the same Redis.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
import redis
import streamlit as st
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.testing.v1 import AppTest

from supportsim.contract.messages import new_id, now_ms
from supportsim.contract.redis_keys import RedisKeys
from supportsim.live.sample import (
    sample_conversation,
    sample_fleet,
    sample_pipeline,
    sample_series,
    write_sample,
)
from supportsim.live.store import DashboardSettings, DashboardStore
from supportsim.local.processes import REPO_ROOT, free_port

APP = str(REPO_ROOT / "dashboard" / "main.py")
HOSTILE = [
    "Hi <script>window.__pwned=1</script> my **laptop** is :red[dead] $x$",
    '<img src=x onerror="window.__pwned=2"> [click](javascript:alert(1))',
]


@pytest.fixture
def app_env(redis_url, prefix, monkeypatch):
    """Environment of the dashboard under test; Streamlit's caches emptied around the test."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("REDIS_KEY_PREFIX", prefix)
    monkeypatch.setenv("DASHBOARD_REFRESH_S", "2")
    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    st.cache_data.clear()
    st.cache_resource.clear()


def run_app() -> AppTest:
    """One full render of the dashboard; fails on any exception in the script."""
    app = AppTest.from_file(APP, default_timeout=60)
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def rerun(app: AppTest) -> AppTest:
    """Render again with fresh data (the short-TTL data cache emptied)."""
    st.cache_data.clear()
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def metrics(app: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in app.metric}


def all_text(app: AppTest) -> str:
    """Every text the script put on the page that a reader sees."""
    parts = [
        e.value
        for kind in ("markdown", "caption", "text", "error", "info", "warning")
        for e in getattr(app, kind)
    ]
    parts += [f"{m.label} {m.value}" for m in app.metric]
    parts += [o for box in app.selectbox for o in box.options]
    return "\n".join(str(p) for p in parts)


def transcript_texts(app: AppTest) -> list[str]:
    """The message texts of the open transcript, in order."""
    return [text.value for bubble in transcript_bubbles(app) for text in bubble.text]


def transcript_bubbles(app: AppTest):
    """The chat bubbles of the open transcript (none when no transcript is open)."""
    try:
        return app.get_by_key("transcript").chat_message
    except KeyError:
        return []


def tiles(app: AppTest) -> list:
    """The wall's tiles, in slot order."""
    return [block for block in app.container if (block.key or "").startswith("wall-")]


def tile_texts(tile) -> list[str]:
    """The message texts in one wall tile, oldest first."""
    return [text.value for bubble in tile.chat_message for text in bubble.text]


def tile_marks(tile) -> str:
    """The markdown (persona line, badges, captions) of one tile."""
    return " ".join(e.value for e in [*tile.markdown, *tile.caption])


def table(app: AppTest):
    """The conversations table as shown."""
    return app.dataframe[0].value


def write(redis_client, prefix, documents, *, with_fleet=True, series=True):
    """Write documents and, as the aggregator would, fleet, series and pipeline counts."""
    now = now_ms()
    fleet = sample_fleet(documents, now) if with_fleet else None
    write_sample(
        redis_client,
        prefix,
        documents,
        fleet=fleet,
        series=sample_series(now) if series else None,
        pipeline=sample_pipeline(now, fleet["messages"]) if fleet and series else None,
    )


# --- empty, unreachable, misconfigured


def test_empty_state_tells_how_to_start(app_env, redis_client):
    app = run_app()
    hint = app.info[0].value
    assert "./dev up" in hint and "docker compose up" in hint
    assert not app.dataframe and not app.metric


def test_unreachable_redis_is_an_error_message_not_a_crash(app_env, monkeypatch):
    monkeypatch.setenv("REDIS_URL", f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    app = run_app()
    assert "Cannot read Redis" in app.error[0].value
    assert "./dev up" in app.info[0].value
    assert "hunter2" not in all_text(app)


def test_refresh_interval_comes_from_the_environment(app_env, monkeypatch):
    monkeypatch.setenv("DASHBOARD_REFRESH_S", "7")
    app = run_app()
    assert "every 7 s" in app.sidebar.caption[0].value
    assert app.toggle[0].value is True
    monkeypatch.setenv("DASHBOARD_REFRESH_S", "0")
    app = run_app()
    assert "off" in app.sidebar.caption[0].value and app.toggle[0].disabled


def test_invalid_settings_are_reported(app_env, monkeypatch):
    monkeypatch.setenv("DASHBOARD_REFRESH_S", "often")
    app = run_app()
    assert "invalid" in app.error[0].value
    assert "dashboard_refresh_s" in app.text[0].value


# --- a few conversations


@pytest.mark.parametrize("count", [1, 2])
def test_a_few_conversations(app_env, redis_client, prefix, count):
    documents = [sample_conversation(i, turns=3 + i) for i in range(count)]
    write(redis_client, prefix, documents)
    app = run_app()
    figures = metrics(app)
    assert figures["Active"] == str(count)
    assert figures["Finished"] == "0"
    assert figures["Messages"] == str(sum(d["messages"] for d in documents))
    assert figures["Customer sentiment"].startswith(("+", "-"))
    assert float(figures["Msgs / min"]) > 0 and float(figures["Tokens / s"]) > 0
    shown = table(app)
    assert sorted(shown["conversation_id"]) == sorted(d["conversation_id"] for d in documents)
    # the most recently updated conversation opens by default, whole transcript
    newest = max(documents, key=lambda d: d["updated_ms"])
    assert app.selectbox[0].value == newest["conversation_id"]
    assert transcript_texts(app) == [m["text"] for m in newest["recent"]]


def test_transcript_marks_speakers_and_sentiment(app_env, redis_client, prefix):
    document = sample_conversation(4, turns=4)
    document["recent"][3]["label"] = None  # a message not scored (yet)
    write(redis_client, prefix, [document])
    app = run_app()
    bubbles = transcript_bubbles(app)
    assert [b.name for b in bubbles] == ["user", "assistant", "user", "assistant"]
    assert bubbles[0].avatar != bubbles[1].avatar
    for bubble, message in zip(bubbles, document["recent"], strict=True):
        marks = " ".join(e.value for e in bubble.markdown)
        assert (message["label"] or "not scored") in marks
        if message["label"]:
            assert f"{message['score']:+.2f}" in marks
        speaker = document["customer" if message["role"] == "customer" else "agent"]["name"]
        assert speaker in bubble.caption[0].value
        assert bubble.text[0].value == message["text"]


def test_message_text_is_shown_literally(app_env, redis_client, prefix):
    document = sample_conversation(1, turns=2, texts=HOSTILE)
    document["customer"]["name"] = "**Eve** <b>"
    write(redis_client, prefix, [document])
    app = run_app()
    assert transcript_texts(app) == HOSTILE
    rendered_as_markdown = " ".join(e.value for e in app.markdown) + all_text(app)
    assert "<script>" not in rendered_as_markdown.replace(HOSTILE[0], "")
    assert "**Eve**" not in " ".join(e.value for e in app.markdown)
    assert r"\*\*Eve\*\* \<b\>" in " ".join(e.value for e in app.markdown)


def test_new_messages_appear_on_the_next_render(app_env, redis_client, prefix):
    document = sample_conversation(2, turns=2)
    write(redis_client, prefix, [document])
    app = run_app()
    assert len(transcript_bubbles(app)) == 2
    document["recent"].append({**document["recent"][-1], "turn": 2, "text": "Any news?"})
    document["messages"] = 3
    document["updated_ms"] += 5000
    write(redis_client, prefix, [document])
    app = rerun(app)
    assert transcript_texts(app)[-1] == "Any news?"
    assert metrics(app)["Turns so far"] == "3"


# --- many and ended conversations


def test_a_thousand_conversations(app_env, redis_client, prefix):
    documents = [sample_conversation(i, turns=6) for i in range(1000)]
    write(redis_client, prefix, documents)
    app = run_app()
    assert metrics(app)["Active"] == "1,000"
    assert len(table(app)) == 1000
    assert len(app.selectbox[0].options) == 1000
    assert len(transcript_bubbles(app)) == 6  # one transcript, not a thousand widgets
    assert len(tiles(app)) == 4 and all(len(tile.chat_message) == 6 for tile in tiles(app))
    assert "1,000 of 1,000 conversations shown" in all_text(app)


def test_ended_conversations_with_their_end_reason(app_env, redis_client, prefix):
    active = [sample_conversation(i) for i in range(2)]
    ended = [
        sample_conversation(i, status="ended", end_reason=reason)
        for i, reason in enumerate(["goodbye", "turn_limit", "error"], start=2)
    ]
    write(redis_client, prefix, active + ended)
    app = run_app()
    figures = metrics(app)
    assert (figures["Active"], figures["Finished"]) == ("2", "3")
    shown = table(app)
    finished = shown[shown["status"] == "ended"]
    assert sorted(finished["end_reason"]) == ["error", "goodbye", "turn_limit"]
    assert shown["status"].tolist()[:2] == ["active", "active"]  # active listed first
    reasons = "Finished by reason: error 1, goodbye 1, turn_limit 1"
    assert reasons in all_text(app).replace("\\", "")  # shown with markdown escapes
    app.selectbox[0].select(ended[1]["conversation_id"]).run()
    assert metrics(app)["Status"] == "ended: turn_limit"
    customer = [p["score"] for p in ended[1]["sentiments"] if p["role"] == "customer"]
    assert metrics(app)["Customer now"] == f"{customer[-1]:+.2f}"


def test_finished_list_is_capped_but_counted(app_env, redis_client, prefix, monkeypatch):
    monkeypatch.setenv("DASHBOARD_MAX_ENDED", "5")
    write(redis_client, prefix, [sample_conversation(i, status="ended") for i in range(8)])
    app = run_app()
    assert len(table(app)) == 5
    assert metrics(app)["Finished"] == "8"
    assert "newest 5 of 8 finished" in all_text(app)


# --- filters, selection, CSV


@pytest.fixture
def mixed(redis_client, prefix) -> list[dict]:
    documents = [sample_conversation(i) for i in range(12)]
    documents += [
        sample_conversation(i, status="ended", end_reason="goodbye") for i in range(12, 16)
    ]
    write(redis_client, prefix, documents)
    return documents


def test_filter_by_mood(app_env, mixed):
    app = run_app()
    app.multiselect(key="mood").select("angry").run()
    shown = table(app)
    assert set(shown["mood"]) == {"angry"}
    assert len(shown) == sum(d["customer"]["mood"] == "angry" for d in mixed)
    assert set(app.selectbox[0].options) <= {
        app.selectbox[0].format_func(d["conversation_id"])
        for d in mixed
        if d["customer"]["mood"] == "angry"
    }


def test_filter_by_product(app_env, mixed):
    app = run_app()
    app.multiselect(key="product").select("router").run()
    shown = table(app)
    assert set(shown["product"]) == {"router"}
    assert len(shown) == sum(d["customer"]["product"] == "router" for d in mixed)


def test_filter_by_status(app_env, mixed):
    app = run_app()
    app.multiselect(key="status").select("ended").run()
    shown = table(app)
    assert len(shown) == 4 and set(shown["end_reason"]) == {"goodbye"}
    app.multiselect(key="status").unselect("ended").select("active").run()
    assert len(table(app)) == 12


def test_search_and_no_match(app_env, mixed):
    app = run_app()
    target = mixed[5]["conversation_id"]
    app.text_input(key="search").input(target[:8]).run()
    assert table(app)["conversation_id"].tolist() == [target]
    app.text_input(key="search").input("nobody by this name").run()
    assert table(app).empty
    assert "No conversation matches" in all_text(app)
    assert not transcript_bubbles(app)


def test_selecting_a_conversation_opens_its_transcript(app_env, mixed):
    app = run_app()
    target = mixed[3]
    app.selectbox[0].select(target["conversation_id"]).run()
    assert transcript_texts(app) == [m["text"] for m in target["recent"]]
    assert target["customer"]["name"] in app.get_by_key("transcript").markdown[0].value


def test_csv_download_holds_the_conversations_in_view(app_env, mixed, monkeypatch):
    downloads = {}
    original = MediaFileManager.add

    def capture(self, data, mimetype, coordinates, file_name=None, **kwargs):
        downloads[file_name] = (mimetype, data)  # the latest run's file wins
        return original(self, data, mimetype, coordinates, file_name, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add", capture)
    app = run_app()
    app.multiselect(key="status").select("ended").run()
    mimetype, data = downloads["conversations.csv"]
    assert mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
    assert [r["conversation_id"] for r in rows] == table(app)["conversation_id"].tolist()
    assert {r["status"] for r in rows} == {"ended"} and {r["end_reason"] for r in rows} == {
        "goodbye"
    }
    assert app.download_button[0].label.startswith("Download")


# --- defensive reading


def test_malformed_and_missing_keys_show_what_is_there(app_env, redis_client, prefix):
    good = [sample_conversation(i) for i in range(2)]
    write(redis_client, prefix, good, with_fleet=False, series=False)
    keys = RedisKeys(prefix)
    broken, wrong_type, missing = new_id(), new_id(), new_id()
    redis_client.set(keys.conversation(broken), "{not json")
    redis_client.hset(keys.conversation(wrong_type), "a", "b")
    redis_client.zadd(keys.active, {broken: now_ms(), wrong_type: now_ms(), missing: now_ms()})
    redis_client.set(keys.fleet, "[1, 2")
    redis_client.set(keys.series, json.dumps([{"bucket_ms": "x"}, 5, None]))
    app = run_app()
    assert sorted(table(app)["conversation_id"]) == sorted(d["conversation_id"] for d in good)
    assert "1 could not be read" in all_text(app)  # the broken one; gone ones are skipped
    assert metrics(app)["Active"] == "3"
    assert metrics(app)["Messages"] == str(sum(d["messages"] for d in good))
    assert "No sentiment series yet." in all_text(app)


def test_wrong_types_at_fleet_and_set_keys(app_env, redis_client, prefix):
    keys = RedisKeys(prefix)
    redis_client.hset(keys.fleet, "a", "b")
    redis_client.set(keys.active, "not a set")
    redis_client.rpush(keys.series, "x")
    app = run_app()
    assert "./dev up" in app.info[0].value


# --- the store's incremental reading


def test_store_reads_only_new_and_changed_conversations(redis_client, prefix):
    documents = [sample_conversation(i) for i in range(30)]
    write(redis_client, prefix, documents)
    store = DashboardStore(redis_client, RedisKeys(prefix), chunk=7)
    fetched: list[list[str]] = []
    original = store._fetch
    store._fetch = lambda ids: fetched.append(list(ids)) or original(ids)
    first = store.snapshot()
    assert len(first.conversations) == 30 and len(fetched[0]) == 30
    assert store.snapshot().conversations.equals(first.conversations)
    assert fetched[1] == []
    changed = documents[4]
    changed["messages"] = 99
    changed["updated_ms"] += 1000
    write(redis_client, prefix, [changed])
    third = store.snapshot()
    assert fetched[2] == [changed["conversation_id"]]
    assert third.conversations.iloc[0]["turns"] == 99  # newest first


def test_store_rereads_a_document_that_lags_its_set_entry(redis_client, prefix):
    document = sample_conversation(0)
    write(redis_client, prefix, [document])
    keys = RedisKeys(prefix)
    # the set moved on, the document not yet (the aggregator writes them in two steps)
    redis_client.zadd(keys.active, {document["conversation_id"]: document["updated_ms"] + 5})
    store = DashboardStore(redis_client, keys)
    assert store.snapshot().conversations.iloc[0]["turns"] == document["messages"]
    document["messages"] += 1
    document["updated_ms"] += 5
    redis_client.set(keys.conversation(document["conversation_id"]), json.dumps(document))
    assert store.snapshot().conversations.iloc[0]["turns"] == document["messages"]


def test_store_lists_a_conversation_in_both_sets_once_as_ended(redis_client, prefix):
    document = sample_conversation(0, status="ended", end_reason="goodbye")
    write(redis_client, prefix, [document])
    keys = RedisKeys(prefix)
    redis_client.zadd(keys.active, {document["conversation_id"]: document["updated_ms"]})
    snap = DashboardStore(redis_client, keys).snapshot()
    assert snap.conversations["status"].tolist() == ["ended"]
    assert (snap.active_total, snap.ended_total) == (0, 1)


def test_store_raises_redis_errors_for_the_page_to_report(prefix):
    settings = DashboardSettings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_key_prefix=prefix
    )
    with pytest.raises(redis.ConnectionError):
        DashboardStore.from_settings(settings).snapshot()


# --- the live wall


@pytest.mark.parametrize("count", [1, 3, 6])
def test_the_wall_shows_the_most_recently_active_conversations_side_by_side(
    app_env, redis_client, prefix, count
):
    now = now_ms()
    documents = [sample_conversation(i, started_ms=now - 90_000 + i * 1000) for i in range(count)]
    write(redis_client, prefix, documents)
    app = run_app()
    shown = tiles(app)
    assert len(shown) == min(count, 4)
    newest = sorted(documents, key=lambda d: d["updated_ms"], reverse=True)[:4]
    for tile, document in zip(shown, newest, strict=True):
        marks = tile_marks(tile)
        assert document["customer"]["name"] in marks and document["customer"]["mood"] in marks
        assert escape(document["card"]["wants"]) in marks  # the card summary
        assert document["conversation_id"][:8] in marks
        assert tile_texts(tile) == [m["text"] for m in document["recent"]]
        bubbles = tile.chat_message
        assert [b.name for b in bubbles] == ["user", "assistant"] * 3  # customer, agent
        for bubble, message in zip(bubbles, document["recent"], strict=True):
            badge = " ".join(e.value for e in bubble.markdown)
            assert f"{message['label']} {message['score']:+.2f}" in badge


def escape(text: str) -> str:
    """How the page escapes model text for markdown (every ASCII punctuation mark)."""
    from supportsim.live.views import escape_markdown

    return escape_markdown(text)


def test_a_tile_shows_the_customer_sentiment_at_the_start_and_now(app_env, redis_client, prefix):
    document = sample_conversation(2, turns=5)
    customer = [p["score"] for p in document["sentiments"] if p["role"] == "customer"]
    write(redis_client, prefix, [document])
    (tile,) = tiles(run_app())
    assert f"customer {customer[0]:+.2f} → {customer[-1]:+.2f}" in tile_marks(tile)


def test_the_wall_size_is_a_setting(app_env, redis_client, prefix, monkeypatch):
    write(redis_client, prefix, [sample_conversation(i) for i in range(5)])
    monkeypatch.setenv("DASHBOARD_WALL_SIZE", "2")
    assert len(tiles(run_app())) == 2
    monkeypatch.setenv("DASHBOARD_WALL_SIZE", "0")
    app = run_app()
    assert tiles(app) == [] and "Live wall off" in app.sidebar.caption[1].value
    assert len(table(app)) == 5  # the rest of the page is unchanged


def test_tiles_update_in_place_as_turns_arrive(app_env, redis_client, prefix):
    now = now_ms()
    documents = [sample_conversation(i, started_ms=now - 90_000 + i * 1000) for i in range(3)]
    write(redis_client, prefix, documents)
    app = run_app()
    before = [tile_marks(t) for t in tiles(app)]
    oldest = min(documents, key=lambda d: d["updated_ms"])
    slot = next(i for i, m in enumerate(before) if oldest["conversation_id"][:8] in m)
    # the oldest conversation speaks: it becomes the most recent, but its tile stays put
    message = {**oldest["recent"][-1], "turn": 6, "role": "customer", "message_id": new_id()}
    message.update(text="Still waiting for that refund.", timestamp_ms=now_ms())
    oldest["recent"].append(message)
    oldest.update(messages=7, last_turn=6, updated_ms=message["timestamp_ms"])
    write(redis_client, prefix, [oldest])
    app = rerun(app)
    after = tiles(app)
    assert [oldest["conversation_id"][:8] in tile_marks(t) for t in after].index(True) == slot
    assert tile_texts(after[slot])[-1] == "Still waiting for that refund."
    assert len(tile_texts(after[slot])) == 6  # the latest six


def test_an_ended_conversation_stays_with_its_outcome_then_leaves(app_env, redis_client, prefix):
    now = now_ms()
    resolved = sample_conversation(
        1, status="ended", end_reason="goodbye", outcome="resolved", started_ms=now - 40_000
    )
    plain = sample_conversation(2, status="ended", end_reason="turn_limit", started_ms=now - 41_000)
    live = sample_conversation(3, started_ms=now - 42_000)
    write(redis_client, prefix, [resolved, plain, live])
    app = run_app()
    marks = {t.key: tile_marks(t) for t in tiles(app)}
    assert len(marks) == 3
    ended_resolved, ended_limit = escape("ended: resolved"), escape("ended: turn_limit")
    assert any(ended_resolved in m and resolved["customer"]["name"] in m for m in marks.values())
    assert any(ended_limit in m for m in marks.values())  # no outcome: the end reason
    assert any("live" in m for m in marks.values())
    # much later the live conversation speaks again: the ended ones have lingered long enough
    live["updated_ms"] = now + 120_000
    write(redis_client, prefix, [live])
    app = rerun(app)
    assert [live["conversation_id"][:8] in tile_marks(t) for t in tiles(app)] == [True]


def test_open_transcript_from_a_tile(app_env, redis_client, prefix):
    now = now_ms()
    documents = [sample_conversation(i, started_ms=now - 90_000 + i * 1000) for i in range(3)]
    write(redis_client, prefix, documents)
    app = run_app()
    app.multiselect(key="mood").select(documents[0]["customer"]["mood"]).run()
    tile = tiles(app)[-1]
    target = next(d for d in documents if d["conversation_id"][:8] in tile_marks(tile))
    tile.button[0].click().run()
    assert not app.exception
    assert app.selectbox[0].value == target["conversation_id"]
    assert transcript_texts(app) == [m["text"] for m in target["recent"]]
    assert app.multiselect(key="mood").value == []  # filters that could hide it are cleared


def test_model_text_on_the_wall_is_literal(app_env, redis_client, prefix):
    document = sample_conversation(1, turns=2, texts=HOSTILE)
    document["customer"]["name"] = "**Eve** <b>"
    document["card"]["wants"] = "<script>alert(1)</script> a :red[refund]"
    write(redis_client, prefix, [document])
    (tile,) = tiles(run_app())
    assert tile_texts(tile) == HOSTILE
    marks = tile_marks(tile)
    assert "**Eve**" not in marks and "<script>" not in marks
    assert r"\*\*Eve\*\* \<b\>" in marks and r"\<script\>" in marks


# --- customer sentiment first, pipeline health


def test_headline_sentiment_is_the_customers_with_the_agents_beside_it(
    app_env, redis_client, prefix
):
    documents = [sample_conversation(i) for i in range(3)]
    fleet = sample_fleet(documents, now_ms())
    fleet["roles"]["customer"]["sentiment_now"] = -0.42
    fleet["roles"]["agent"]["sentiment_now"] = 0.77
    write_sample(redis_client, prefix, documents, fleet=fleet, series=sample_series(now_ms()))
    app = run_app()
    assert metrics(app)["Customer sentiment"] == "-0.42"
    assert "Agent +0.77" in all_text(app)


def test_a_scoring_backlog_is_visible_and_rates_are_not_zero(app_env, redis_client, prefix):
    documents = [sample_conversation(i) for i in range(3)]
    now = now_ms()
    fleet = sample_fleet(documents, now - 400_000)  # nothing scored for 400 s
    pipeline = sample_pipeline(now, fleet["messages"] + 2400, dead_letters=3)
    pipeline["dead_letters"] = 5  # two of them longer ago than five minutes
    series = sample_series(now - 400_000)
    write_sample(redis_client, prefix, documents, fleet=fleet, series=series, pipeline=pipeline)
    app = run_app()
    figures = metrics(app)
    assert float(figures["Msgs / min"]) >= 30  # what the bots wrote: 6 per 10 s
    assert float(figures["Tokens / s"]) > 0
    assert figures["Scoring behind"] == "2,400"
    assert figures["Dead letters"] == "3"
    text = all_text(app)
    assert "400.0 s of chat behind" in text and "5 in all" in text
    assert "Sentiment scoring is behind the chat: 2,400 messages" in app.warning[0].value


def test_no_warning_when_scoring_keeps_up(app_env, redis_client, prefix):
    documents = [sample_conversation(i) for i in range(2)]
    write(redis_client, prefix, documents)
    app = run_app()
    assert not app.warning
    assert metrics(app)["Scoring behind"] == "0"
    assert metrics(app)["Dead letters"] == "0"


@pytest.mark.parametrize(("bucket_ms", "per_minute"), [(30_000, "12.0"), (None, "36.0")])
def test_rates_use_the_bucket_size_written_in_the_data(
    app_env, redis_client, prefix, bucket_ms, per_minute
):
    # one bucket of 6 chat messages that has just started: a young series counts over one
    # whole bucket, so the rate is 6 per 30 s where the data says 30 s, else 6 per 10 s
    documents = [sample_conversation(i) for i in range(2)]
    now = now_ms()
    fleet = sample_fleet(documents, now, bucket_ms=bucket_ms or 10_000)
    pipeline = sample_pipeline(now, fleet["messages"], buckets=0, bucket_ms=bucket_ms or 10_000)
    pipeline["series"] = [
        {"bucket_ms": now, "chat_messages": 6, "chat_completion_tokens": 150, "dead_letters": 0}
    ]
    if bucket_ms is None:  # an older aggregator: no bucket size in the data
        del fleet["series_bucket_ms"], pipeline["series_bucket_ms"]
    write_sample(redis_client, prefix, documents, fleet=fleet, series=[], pipeline=pipeline)
    app = run_app()
    assert metrics(app)["Msgs / min"] == per_minute
    (sentiment,) = [m for m in app.metric if m.label == "Customer sentiment"]
    assert sentiment.proto.help.endswith(
        f"customer messages per {(bucket_ms or 10_000) // 1000} s."
    )
