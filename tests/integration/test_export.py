"""Export, compare and the live dataset sink against the real broker."""

from __future__ import annotations

import argparse
import csv
import json
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from confluent_kafka import Producer

from supportsim.contract.messages import new_id
from supportsim.datasets.export import ExportOptions, add_export_commands, export
from supportsim.kafka.app import make_app
from supportsim.sentiment.compare import add_compare_command, compare
from supportsim.settings import ServiceSettings
from supportsim.sinks.dataset_files import ConversationFiles
from tests.support import ServiceProcess, chat_message, produce, produce_json

BASE = 1_790_000_000_000  # a fixed time so expected rows do not depend on the clock
LABEL = {0.8: "positive", 0.6: "positive", 0.2: "neutral", -0.2: "neutral", -0.8: "negative"}


def scored(cid: str, turn: int, score: float, *, ts: int, final=False, **overrides) -> dict:
    """A valid chat-scored message."""
    message = chat_message(
        cid,
        turn,
        timestamp_ms=ts,
        final=final,
        end_reason=overrides.pop("end_reason", "goodbye" if final else None),
        **overrides,
    )
    label = LABEL.get(score, "neutral")
    message["sentiment"] = {"label": label, "score": score, "model": "test-model"}
    return message


def create_topics(settings: ServiceSettings) -> None:
    make_app(settings, group="export-test-setup", exactly_once=False)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def all_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def known_stream(service_env, broker):
    """Three conversations (two complete, one cut off), a duplicate and three bad records."""
    settings = ServiceSettings()
    create_topics(settings)
    a, b, c = new_id(), new_id(), new_id()
    conv_a = [
        scored(a, 0, -0.8, ts=BASE + 1000),
        scored(a, 1, 0.2, ts=BASE + 2000),
        scored(a, 2, -0.2, ts=BASE + 3000),
        scored(a, 3, 0.6, ts=BASE + 4000, final=True),
    ]
    extra = {
        "channel": "web",
        "customer": {"name": "Ines", "mood": "calm", "product": "tv", "age": 41},
    }
    conv_b = [
        scored(b, 0, 0.2, ts=BASE + 500, **extra),
        scored(b, 1, 0.8, ts=BASE + 600, final=True, end_reason="turn_limit", **extra),
    ]
    conv_c = [scored(c, 0, -0.8, ts=BASE + 5000), scored(c, 1, 0.2, ts=BASE + 6000)]
    produce_json(broker, settings.scored_topic, [*conv_a, *conv_b, *conv_c, conv_a[1]])
    unscored = chat_message(new_id(), 0)
    produce(
        broker,
        settings.scored_topic,
        [
            (b"k1", b"not json"),
            (unscored["conversation_id"].encode(), json.dumps(unscored).encode()),
            (b"wrong-key", json.dumps(scored(new_id(), 0, 0.2, ts=BASE)).encode()),
        ],
    )
    return {"a": conv_a, "b": conv_b, "c": conv_c, "settings": settings}


def test_export_writes_exactly_the_expected_rows_and_is_deterministic(known_stream, tmp_path):
    a, b, c = known_stream["a"], known_stream["b"], known_stream["c"]
    options = dict(chat_jsonl=True, formats=("csv", "jsonl"), progress=False)
    first = export(ExportOptions(out=tmp_path / "one", **options))
    second = export(ExportOptions(out=tmp_path / "two", **options))
    assert all_files(tmp_path / "one") == all_files(tmp_path / "two")

    assert (first.messages, first.conversations, first.complete, first.incomplete) == (8, 3, 2, 1)
    assert first.duplicates == 1 and first.bad_records == 3 and second.bad_records == 3
    assert first.bad_reasons == {
        "invalid ScoredMessage": 1,
        "key does not match conversation_id": 1,
        "value is not JSON": 1,
    }
    out = tmp_path / "one"
    assert sorted(all_files(out)) == [
        "chat.jsonl",
        "conversations.csv",
        "conversations.jsonl",
        "manifest.json",
        "messages.csv",
        "messages.jsonl",
        "rejected.jsonl",
    ]
    assert not [p for p in out.iterdir() if p.name.startswith(".export-")]

    messages = read_jsonl(out / "messages.jsonl")
    # conversations by first timestamp (b, a, c), messages in turn order
    assert [m["message_id"] for m in messages] == [m["message_id"] for m in (*b, *a, *c)]
    row = messages[2]
    source = a[0]
    assert {k: row[k] for k in list(row)[:19]} == {
        "conversation_id": source["conversation_id"],
        "message_id": source["message_id"],
        "turn": 0,
        "role": "customer",
        "text": "message 0",
        "timestamp_ms": BASE + 1000,
        "customer_name": "Dana",
        "customer_mood": "angry",
        "customer_product": "laptop",
        "agent_name": "Sam",
        "model": "test",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "latency_ms": 100,
        "final": False,
        "end_reason": None,
        "sentiment_label": "negative",
        "sentiment_score": -0.8,
        "sentiment_model": "test-model",
    }
    assert row["conversation_complete"] is True
    assert isinstance(row["kafka_partition"], int) and isinstance(row["kafka_offset"], int)
    assert messages[0]["channel"] == "web" and messages[0]["customer_age"] == 41
    assert "channel" not in row
    assert [m["conversation_complete"] for m in messages] == [True] * 6 + [False] * 2

    with open(out / "messages.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert len(table) == 8
    assert list(table[0])[19:21] == ["channel", "customer_age"]  # extras after the contract
    assert table[0]["channel"] == "web" and table[2]["channel"] == ""
    assert table[2]["final"] == "false" and table[5]["final"] == "true"

    summaries = read_jsonl(out / "conversations.jsonl")
    assert [s["conversation_id"] for s in summaries] == [
        b[0]["conversation_id"],
        a[0]["conversation_id"],
        c[0]["conversation_id"],
    ]
    assert summaries[1] == {
        "conversation_id": a[0]["conversation_id"],
        "customer_name": "Dana",
        "customer_mood": "angry",
        "customer_product": "laptop",
        "agent_name": "Sam",
        "turns": 4,
        "first_turn": 0,
        "last_turn": 3,
        "end_reason": "goodbye",
        "complete": True,
        "incomplete_reason": "",
        "first_sentiment": -0.8,
        "last_sentiment": 0.6,
        "mean_sentiment": -0.05,
        "min_sentiment": -0.8,
        "customer_first_sentiment": -0.8,
        "customer_last_sentiment": -0.2,
        "customer_sentiment_change": 0.6,
        "prompt_tokens": 40,
        "completion_tokens": 20,
        "total_tokens": 60,
        "started_ms": BASE + 1000,
        "ended_ms": BASE + 4000,
        "duration_ms": 3000,
        "chat_models": "test",
        "sentiment_models": "test-model",
    }
    assert summaries[0]["customer_name"] == "Ines" and summaries[0]["end_reason"] == "turn_limit"
    assert summaries[2]["complete"] is False
    assert summaries[2]["incomplete_reason"] == "no final message"

    chats = read_jsonl(out / "chat.jsonl")
    assert [chat["conversation_id"] for chat in chats] == [s["conversation_id"] for s in summaries]
    assert [m["role"] for m in chats[1]["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert "Sam" in chats[1]["messages"][0]["content"]
    assert "angry" not in json.dumps(chats), "the agent's training line hides the customer's mood"
    assert chats[1]["messages"][1]["content"] == "message 0"
    assert chats[2]["complete"] is False

    rejected = read_jsonl(out / "rejected.jsonl")
    assert [r["value"] for r in rejected if r["key"] == "k1"] == ["not json"]
    assert len(rejected) == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bad_records"] == 3 and manifest["records_read"] == 12


def test_incomplete_conversations_are_skipped_with_complete_only(known_stream, tmp_path):
    report = export(
        ExportOptions(out=tmp_path, complete_only=True, progress=False, chat_jsonl=True)
    )
    cut_off = known_stream["c"][0]["conversation_id"]
    assert (report.conversations, report.messages, report.skipped_incomplete) == (2, 6, 1)
    for name in ("messages.jsonl", "conversations.jsonl", "chat.jsonl"):
        assert cut_off not in (tmp_path / name).read_text()
    assert all(s["complete"] for s in read_jsonl(tmp_path / "conversations.jsonl"))


ERROR_LINE = "[this conversation ended because the customer bot failed: TimeoutError]"


def test_error_and_loop_endings_are_incomplete_by_default_and_the_error_line_is_no_turn(
    service_env, broker, tmp_path
):
    settings = ServiceSettings()
    create_topics(settings)
    failed, looped, finished = new_id(), new_id(), new_id()
    stream = [
        *(scored(failed, t, 0.2, ts=BASE + t) for t in range(3)),
        scored(failed, 3, -0.8, ts=BASE + 3, final=True, end_reason="error", text=ERROR_LINE),
        *(scored(looped, t, 0.2, ts=BASE + 10 + t) for t in range(3)),
        scored(looped, 3, 0.2, ts=BASE + 13, final=True, end_reason="loop", text="message 1"),
        *(scored(finished, t, 0.6, ts=BASE + 20 + t, final=t == 1) for t in range(2)),
    ]
    produce_json(broker, settings.scored_topic, stream)
    out = tmp_path / "default"
    report = export(
        ExportOptions(out=out, chat_jsonl=True, formats=("csv", "jsonl"), progress=False)
    )
    assert (report.complete, report.incomplete) == (1, 2)
    summaries = {s["conversation_id"]: s for s in read_jsonl(out / "conversations.jsonl")}
    assert summaries[failed]["incomplete_reason"] == "ended by error"
    assert summaries[looped]["incomplete_reason"] == "ended by loop"
    for name in ("chat.jsonl", "messages.jsonl", "messages.csv"):
        assert "bot failed" not in (out / name).read_text(), f"{name} shows the error line"
    (error_row,) = [m for m in read_jsonl(out / "messages.jsonl") if m["end_reason"] == "error"]
    assert error_row["text"] is None and error_row["final"] is True
    chats = {c["conversation_id"]: c for c in read_jsonl(out / "chat.jsonl")}
    assert len(chats[failed]["messages"]) == 1 + 3, "system line and the three spoken turns"
    report = export(ExportOptions(out=tmp_path / "skip", complete_only=True, progress=False))
    assert (report.conversations, report.skipped_incomplete) == (1, 2)
    included = tmp_path / "included"
    report = export(ExportOptions(out=included, include_failed_endings=True, progress=False))
    assert (report.complete, report.incomplete) == (3, 0)
    manifest = json.loads((included / "manifest.json").read_text())
    assert manifest["include_failed_endings"] is True


def test_time_range_and_conversation_filters_flag_partial_conversations(known_stream, tmp_path):
    a = known_stream["a"]
    cid = a[0]["conversation_id"]
    report = export(
        ExportOptions(
            out=tmp_path,
            since_ms=BASE + 2000,
            until_ms=BASE + 4000,
            conversations=frozenset({cid}),
            progress=False,
        )
    )
    assert (report.messages, report.outside_filter, report.duplicates) == (2, 6, 1)
    (summary,) = read_jsonl(tmp_path / "conversations.jsonl")
    assert summary["complete"] is False and summary["turns"] == 2
    assert summary["incomplete_reason"] == "missing turns 0; no final message"


def test_cli_export_parquet_and_compare_commands(known_stream, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    add_export_commands(commands)
    add_compare_command(commands)
    args = parser.parse_args(
        ["export", "--out", str(tmp_path), "--format", "parquet,jsonl", "--no-progress"]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "exported 8 messages in 3 conversations (2 complete, 1 incomplete)" in printed
    assert "3 bad records skipped" in printed
    table = pq.read_table(tmp_path / "messages.parquet")
    assert table.num_rows == 8 and table.schema.field("sentiment_score").type == "double"
    assert pq.read_table(tmp_path / "conversations.parquet").num_rows == 3
    first = (tmp_path / "messages.parquet").read_bytes()
    assert args.func(args) == 0
    assert (tmp_path / "messages.parquet").read_bytes() == first

    bad = parser.parse_args(["export", "--out", str(tmp_path), "--topic", "no-such-topic-x"])
    assert bad.func(bad) == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_empty_topic_exports_empty_files_and_replaces_an_earlier_export(
    service_env, broker, tmp_path
):
    create_topics(ServiceSettings())
    (tmp_path / "chat.jsonl").write_text("from an earlier export\n")
    report = export(ExportOptions(out=tmp_path, progress=False))
    assert (report.messages, report.conversations, report.records_read) == (0, 0, 0)
    assert (tmp_path / "messages.csv").read_text().startswith("conversation_id,message_id,")
    assert (tmp_path / "messages.jsonl").read_text() == ""
    assert not (tmp_path / "chat.jsonl").exists()


def test_export_stops_at_the_end_found_at_start_on_a_live_topic(service_env, broker, tmp_path):
    settings = ServiceSettings()
    create_topics(settings)
    cid = new_id()
    produce_json(
        broker, settings.scored_topic, [scored(cid, t, 0.2, ts=BASE + t) for t in range(200)]
    )
    stop = threading.Event()

    def keep_writing():
        while not stop.is_set():
            produce_json(broker, settings.scored_topic, [scored(new_id(), 0, 0.2, ts=BASE)] * 50)

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    try:
        time.sleep(0.5)
        report = export(ExportOptions(out=tmp_path, progress=False))
    finally:
        stop.set()
        writer.join(10)
    assert report.messages >= 200 and report.stalled_partitions == []


def test_a_read_committed_export_leaves_out_an_open_transaction_and_says_so(
    service_env, broker, prefix, tmp_path, monkeypatch
):
    monkeypatch.setenv("KAFKA_ISOLATION_LEVEL", "read_committed")
    settings = ServiceSettings()
    create_topics(settings)
    cid = new_id()
    committed = [scored(cid, t, 0.2, ts=BASE + t) for t in range(6)]
    produce_json(broker, settings.scored_topic, committed)
    txn = Producer({"bootstrap.servers": broker, "transactional.id": f"{prefix}export-open"})
    txn.init_transactions()
    txn.begin_transaction()
    for turn in range(6, 9):
        message = scored(cid, turn, 0.2, ts=BASE + turn)
        txn.produce(settings.scored_topic, key=cid.encode(), value=json.dumps(message).encode())
    txn.flush(10)
    try:
        started = time.monotonic()
        report = export(ExportOptions(out=tmp_path, progress=False, stall_timeout=30))
        seconds = time.monotonic() - started
    finally:
        txn.abort_transaction(10)
    assert report.messages == 6 and report.stalled_partitions == []
    assert sum(report.held_back.values()) == 3, report.held_back
    assert seconds < 20, "the export waited on the open transaction"
    assert "3 offsets of partitions" in report.describe()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["held_back"] == report.held_back


def test_export_memory_stays_flat_with_10k_messages(service_env, broker, tmp_path):
    """Python-side peak (tracemalloc) is a small fraction of what holding every message takes.

    The bench (bench/export.py) measures process RSS at 5,000 and 50,000 messages.
    """
    settings = ServiceSettings()
    create_topics(settings)
    messages = []
    for conversation in range(1000):
        cid = new_id()
        for turn in range(10):
            messages.append(
                scored(cid, turn, 0.2, ts=BASE + conversation * 10 + turn, final=turn == 9)
            )
    produce_json(broker, settings.scored_topic, messages)
    raw = [json.dumps(m) for m in messages]
    del messages
    tracemalloc.start()
    try:
        held = [json.loads(value) for value in raw]  # what a load-everything export holds
        everything, _ = tracemalloc.get_traced_memory()
        del held, raw
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        report = export(ExportOptions(out=tmp_path, progress=False, formats=("jsonl",)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    growth = peak - base
    print(
        f"export of 10,000 messages: Python peak growth {growth / 2**20:.2f} MiB; "
        f"the messages as dicts alone: {everything / 2**20:.1f} MiB"
    )
    assert report.messages == 10_000 and report.complete == 1000
    assert growth < everything / 5, (growth, everything)


def test_compare_two_scored_topics_gives_the_expected_table(service_env, broker, prefix):
    settings = ServiceSettings()
    create_topics(settings)
    v2 = f"{prefix}chat-scored-v2"
    create_topics(ServiceSettings(scored_topic=v2))
    # (label by model A, label by model B) for messages in both topics
    pairs = (
        [("negative", "negative")] * 6
        + [("negative", "neutral")] * 2
        + [("neutral", "neutral")] * 3
        + [("positive", "positive")] * 4
        + [("positive", "neutral")] * 1
    )
    score = {"negative": -0.7, "neutral": 0.0, "positive": 0.7}
    a_side, b_side = [], []
    for label_a, label_b in pairs:
        message = chat_message(new_id(), 0)
        a_side.append(
            {**message, "sentiment": {"label": label_a, "score": score[label_a], "model": "m1"}}
        )
        b_side.append(
            {**message, "sentiment": {"label": label_b, "score": score[label_b], "model": "m2"}}
        )
    only_a = [
        {
            **chat_message(new_id(), 0),
            "sentiment": {"label": "neutral", "score": 0.0, "model": "m1"},
        }
    ] * 1
    only_b = [
        {
            **chat_message(new_id(), 0),
            "sentiment": {"label": "neutral", "score": 0.0, "model": "m2"},
        }
        for _ in range(3)
    ]
    produce_json(broker, settings.scored_topic, [*a_side, *only_a])
    produce_json(broker, v2, [*b_side, *only_b])
    produce(broker, v2, [(b"x", b"garbage")])

    result = compare(settings.scored_topic, v2, progress=False)
    assert (result.both, result.only_a, result.only_b, result.bad_a, result.bad_b) == (
        16,
        1,
        3,
        0,
        1,
    )
    assert result.agreed == 13 and result.agreement == pytest.approx(13 / 16)
    assert result.confusion == {
        ("negative", "negative"): 6,
        ("negative", "neutral"): 2,
        ("neutral", "neutral"): 3,
        ("positive", "positive"): 4,
        ("positive", "neutral"): 1,
    }
    per_label = {row["label"]: row for row in result.per_label()}
    assert per_label["negative"] == {
        "label": "negative",
        "a": 8,
        "b": 6,
        "both": 6,
        "agreement": 12 / 14,
    }
    assert per_label["neutral"]["agreement"] == pytest.approx(6 / 9)
    assert result.models_a == {"m1": 17} and result.models_b == {"m2": 19}
    text = result.render()
    assert "16 in both, 1 only in A, 3 only in B" in text
    assert "overall agreement: 81.2% (13/16)" in text


def test_dataset_sink_appends_finished_conversations_once_across_a_crash(
    service_env, broker, tmp_path
):
    settings = ServiceSettings()
    create_topics(settings)
    folder = tmp_path / "dataset"
    env = {**service_env, "DATASET_DIR": str(folder), "COMMIT_INTERVAL": "0.2"}
    first, second, open_one = new_id(), new_id(), new_id()
    produce_json(
        broker,
        settings.scored_topic,
        [
            *(scored(first, t, 0.2, ts=BASE + t, final=t == 2) for t in range(3)),
            scored(open_one, 0, -0.8, ts=BASE + 10),
            *(scored(second, t, 0.6, ts=BASE + 20 + t, final=t == 1) for t in range(2)),
        ],
    )
    produce(broker, settings.scored_topic, [(b"k", b"not json")])

    def written() -> list[dict]:
        path = folder / "conversations.jsonl"
        return read_jsonl(path) if path.exists() else []

    def wait_for(count: int, sink: ServiceProcess) -> list[dict]:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(written()) < count:
            assert sink.alive(), sink.log()[-3000:]
            time.sleep(0.3)
        return written()

    sink = ServiceProcess("dataset_sink", env, tmp_path).start()
    try:
        assert {s["conversation_id"] for s in wait_for(2, sink)} == {first, second}
    finally:
        sink.kill()  # a crash: nothing flushed or committed on the way out
    produce_json(
        broker, settings.scored_topic, [scored(open_one, 1, 0.2, ts=BASE + 11, final=True)]
    )
    sink = ServiceProcess("dataset_sink", env, tmp_path).start()
    try:
        rows = wait_for(3, sink)
        time.sleep(2)  # room for a wrong duplicate to appear
        rows = written()
    finally:
        sink.stop()
    assert sorted(s["conversation_id"] for s in rows) == sorted([first, second, open_one])
    assert all(s["complete"] for s in rows)
    messages = read_jsonl(folder / "messages.jsonl")
    assert len(messages) == 7 and len({m["message_id"] for m in messages}) == 7
    assert len(read_jsonl(folder / "chat.jsonl")) == 3
    # the folder is readable by a fresh writer: nothing torn, nothing to cut
    files = ConversationFiles(folder)
    files.open()
    assert files.append([]) == 0
