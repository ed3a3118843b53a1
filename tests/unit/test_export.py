"""Dataset rows, summaries, chat records, the crash-safe dataset files, export and compare logic."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import timedelta

import pytest
from quixstreams.state.rocksdb import RocksDBStorePartition

from supportsim.contract.messages import new_id
from supportsim.datasets.export import (
    ConversationStore,
    ExportError,
    ExportOptions,
    add_export_commands,
    parse_formats,
    parse_time,
    read_conversation_ids,
    rejection_reason,
)
from supportsim.datasets.rows import (
    CONVERSATION_COLUMNS,
    MESSAGE_COLUMNS,
    chat_record,
    message_row,
    summarize,
)
from supportsim.datasets.writers import CsvRows, csv_cell
from supportsim.sentiment.compare import Comparison, add_compare_command
from supportsim.sinks.dataset_files import (
    ConversationFiles,
    collect_conversation,
    dataset_sink_enabled,
)
from tests.support import chat_message


def scored(cid: str, turn: int, score: float = 0.0, **overrides) -> dict:
    message = chat_message(cid, turn, **{"timestamp_ms": 1000 + turn, **overrides})
    message["sentiment"] = {"label": "neutral", "score": score, "model": "m"}
    return message


def rows_of(cid: str, scores: list[float], final: bool = True) -> list[dict]:
    last = len(scores) - 1
    return [
        message_row(
            scored(
                cid, t, s, final=final and t == last, end_reason="goodbye" if t == last else None
            ),
            0,
            t,
        )
        for t, s in enumerate(scores)
    ]


# --- options ---


def test_times_parse_as_epoch_ms_or_iso_8601_in_utc():
    assert parse_time("1790000000000") == 1_790_000_000_000
    assert parse_time("2026-11-03T14:00:00Z") == 1_793_714_400_000
    assert parse_time("2026-11-03T15:00:00+01:00") == 1_793_714_400_000
    assert parse_time("2026-11-03T14:00:00") == 1_793_714_400_000  # no zone: UTC
    assert parse_time("2026-11-03") == 1_793_664_000_000
    with pytest.raises(ExportError, match="not a time"):
        parse_time("yesterday")


def test_formats_are_checked_and_put_in_canonical_order(monkeypatch):
    assert parse_formats("jsonl, csv") == ("csv", "jsonl")
    with pytest.raises(ExportError, match="--format"):
        parse_formats("csv,xlsx")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    with pytest.raises(ExportError, match="pip install pyarrow"):
        parse_formats("csv,parquet")


def test_conversation_ids_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("# wanted\nabc\n\n def  # the second\nabc\n")
    assert read_conversation_ids(path) == {"abc", "def"}
    with pytest.raises(ExportError, match="cannot read"):
        read_conversation_ids(tmp_path / "missing.txt")


def test_options_filter_by_time_range_and_conversation():
    options = ExportOptions(out=".", since_ms=100, until_ms=200, conversations=frozenset({"a"}))
    assert options.wants("a", 100) and options.wants("a", 199)
    assert not options.wants("a", 99) and not options.wants("a", 200)
    assert not options.wants("b", 150)
    assert ExportOptions(out=".").wants("anything", 0)


def test_cli_registers_export_and_compare_with_their_options():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    add_export_commands(commands)
    add_compare_command(commands)
    args = parser.parse_args(["export", "--conversation", "a", "--conversation", "b"])
    assert (args.out, args.format, args.conversation) == ("dataset", "csv,jsonl", ["a", "b"])
    assert not args.complete_only and not args.chat_jsonl and not args.include_failed_endings
    args = parser.parse_args(["export", "--include-failed-endings"])
    assert args.include_failed_endings
    args = parser.parse_args(["compare", "--b", "chat-scored-v2"])
    assert (args.a, args.b, args.json) == (None, "chat-scored-v2", False)


# --- rows and summaries ---


def test_message_row_flattens_the_contract_and_keeps_extra_fields_after_it():
    message = scored(new_id(), 0, 0.5, channel="web", meta={"lang": "en", "tags": ["a"]})
    message["customer"]["age"] = 41
    message["sentiment"]["probabilities"] = {"positive": 0.7}
    row = message_row(message, 2, 17)
    assert list(row)[: len(MESSAGE_COLUMNS)] == MESSAGE_COLUMNS
    assert list(row)[len(MESSAGE_COLUMNS) :] == [
        "channel",
        "customer_age",
        "meta_lang",
        "meta_tags",
        "sentiment_probabilities_positive",
        "kafka_partition",
        "kafka_offset",
    ]
    assert (row["customer_name"], row["agent_name"], row["sentiment_score"]) == ("Dana", "Sam", 0.5)
    assert (row["kafka_partition"], row["kafka_offset"], row["meta_tags"]) == (2, 17, ["a"])


def test_summary_of_a_complete_conversation():
    cid = new_id()
    summary = summarize(rows_of(cid, [-0.8, 0.2, -0.2, 0.6]))
    assert list(summary) == CONVERSATION_COLUMNS
    assert summary["complete"] is True and summary["incomplete_reason"] == ""
    assert (summary["turns"], summary["end_reason"], summary["duration_ms"]) == (4, "goodbye", 3)
    assert (summary["first_sentiment"], summary["last_sentiment"]) == (-0.8, 0.6)
    assert (summary["mean_sentiment"], summary["min_sentiment"]) == (-0.05, -0.8)
    # customer turns are the even ones here: -0.8 then -0.2
    assert summary["customer_sentiment_change"] == 0.6
    assert summary["total_tokens"] == 60


@pytest.mark.parametrize(
    ("turns", "final_turn", "reason"),
    [
        ([0, 1, 3], 3, "missing turns 2"),
        ([0, 1, 1, 2], 2, "repeated turns 1"),
        ([0, 1, 2], None, "no final message"),
        ([0, 1, 2], 1, "messages after the final one"),
        ([2, 3], 3, "missing turns 0, 1"),
    ],
)
def test_incomplete_conversations_say_why(turns, final_turn, reason):
    cid = new_id()
    rows = [message_row(scored(cid, t, final=t == final_turn), 0, i) for i, t in enumerate(turns)]
    summary = summarize(rows)
    assert summary["complete"] is False
    assert summary["incomplete_reason"] == reason


def test_a_persona_change_makes_a_conversation_incomplete():
    cid = new_id()
    rows = rows_of(cid, [0.0, 0.0])
    rows[1]["customer_mood"] = "calm"
    assert summarize(rows)["incomplete_reason"] == "persona changed during the conversation"


def test_chat_record_maps_agent_to_assistant_and_customer_to_user():
    cid = new_id()
    rows = rows_of(cid, [0.0, 0.0, 0.0])
    record = chat_record(summarize(rows), list(reversed(rows)))
    assert record["conversation_id"] == cid and record["complete"] is True
    roles = [m["role"] for m in record["messages"]]
    assert roles == ["system", "user", "assistant", "user"]  # chat_message: even turns customer
    assert record["messages"][0]["content"] == (
        "You are Sam, a customer support agent. You are chatting with Dana."
    )
    assert [m["content"] for m in record["messages"][1:]] == ["message 0", "message 1", "message 2"]


# --- what a dataset must not carry: failed endings as complete, the error line, hidden persona ---

ERROR_LINE = "[this conversation ended because the agent bot failed: RuntimeError]"


def ended_by(cid: str, end_reason: str, text: str = "message 3") -> list[dict]:
    """Four turns, the last one final with `end_reason`."""
    return [
        message_row(
            scored(
                cid,
                t,
                -0.5 if t == 3 else 0.5,
                final=t == 3,
                end_reason=end_reason if t == 3 else None,
                **({"text": text} if t == 3 else {}),
            ),
            0,
            t,
        )
        for t in range(4)
    ]


@pytest.mark.parametrize("end_reason", ["error", "loop"])
def test_error_and_loop_endings_are_incomplete_unless_included(end_reason):
    rows = ended_by(new_id(), end_reason)
    summary = summarize(rows)
    assert summary["complete"] is False
    assert summary["incomplete_reason"] == f"ended by {end_reason}"
    assert summary["end_reason"] == end_reason
    included = summarize(rows, include_failed_endings=True)
    assert included["complete"] is True and included["incomplete_reason"] == ""


@pytest.mark.parametrize("end_reason", ["goodbye", "turn_limit"])
def test_finished_endings_are_complete(end_reason):
    assert summarize(ended_by(new_id(), end_reason))["complete"] is True


def test_the_error_line_is_no_chat_turn_in_any_row():
    cid = new_id()
    rows = ended_by(cid, "error", text=ERROR_LINE)
    assert rows[-1]["text"] is None, "message rows drop the bot's failure notice"
    assert rows[-1]["final"] is True and rows[-1]["end_reason"] == "error"
    summary = summarize(rows, include_failed_endings=True)
    assert summary["last_sentiment"] == 0.5, "the notice's score is no one's sentiment"
    assert summary["min_sentiment"] == 0.5
    record = chat_record(summary, rows)
    contents = [m["content"] for m in record["messages"][1:]]
    assert contents == ["message 0", "message 1", "message 2"]
    assert "failed" not in json.dumps(record)
    assert all(m["content"] is not None for m in record["messages"])


def test_a_loop_ending_keeps_its_last_turn():
    rows = ended_by(new_id(), "loop")
    record = chat_record(summarize(rows), rows)
    assert [m["content"] for m in record["messages"][1:]][-1] == "message 3"


def test_chat_record_carries_no_hidden_persona_fact():
    """Built from an allow-list: the mood, the product and any field added to the messages later
    (the customer's card, an outcome, a remedy) stay out of the agent's training line."""
    cid = new_id()
    card = {"order_number": "NW-48213", "symptom": "drops the connection", "wants": "a refund"}
    rows = [
        message_row(
            scored(
                cid,
                t,
                final=t == 2,
                end_reason="goodbye" if t == 2 else None,
                card=card,
                outcome="resolved" if t == 2 else None,
                remedy="replacement",
                customer={"name": "Dana", "mood": "furious", "product": "hovercraft"},
            ),
            0,
            t,
        )
        for t in range(3)
    ]
    assert rows[0]["card_order_number"] == "NW-48213", "analysis rows keep every field"
    record = chat_record(summarize(rows), rows)
    assert set(record) == {"conversation_id", "complete", "messages"}
    assert all(set(m) == {"role", "content"} for m in record["messages"])
    text = json.dumps(record)
    for hidden in ("furious", "hovercraft", "NW-48213", "drops the connection", "refund", "card"):
        assert hidden not in text, f"the agent's training line carries {hidden!r}"
    assert "Dana" in record["messages"][0]["content"], "the agent knows whom it greets"


def test_dataset_files_flag_failed_endings_and_can_include_them(tmp_path):
    error = ended_by(new_id(), "error", text=ERROR_LINE)
    files = ConversationFiles(tmp_path / "a")
    files.open()
    files.append([error])
    summary = json.loads((tmp_path / "a" / "conversations.jsonl").read_text())
    assert summary["complete"] is False and summary["incomplete_reason"] == "ended by error"
    for name in ("messages.jsonl", "chat.jsonl"):
        assert "bot failed" not in (tmp_path / "a" / name).read_text(), name
    included = ConversationFiles(tmp_path / "b", include_failed_endings=True)
    included.open()
    included.append([error])
    summary = json.loads((tmp_path / "b" / "conversations.jsonl").read_text())
    assert summary["complete"] is True


def test_store_summarizes_failed_endings_as_asked(tmp_path):
    for include, complete in ((False, 0), (True, 1)):
        store = ConversationStore(tmp_path / f"spill-{include}.sqlite", include)
        for row in ended_by(new_id(), "loop"):
            store.add(row)
        store.summarize()
        assert store.counts() == (complete, 1 - complete)
        store.close()


def test_csv_cells_and_rejection_kinds():
    assert [csv_cell(v) for v in (None, True, False, 1.5, "x")] == ["", "true", "false", 1.5, "x"]
    assert csv_cell({"b": 1, "a": [2]}) == '{"a": [2], "b": 1}'
    assert rejection_reason("value is not JSON: Expecting value") == "value is not JSON"
    assert rejection_reason("key b'x' does not match conversation_id 'y'") == (
        "key does not match conversation_id"
    )


# --- the spill store ---


def test_store_dedupes_by_message_id_and_orders_conversations_by_first_timestamp(tmp_path):
    store = ConversationStore(tmp_path / "spill.sqlite")
    late, early = new_id(), new_id()
    late_rows = [
        message_row(scored(late, t, final=t == 1, timestamp_ms=5000 + t), 1, 10 + t)
        for t in range(2)
    ]
    early_rows = [message_row(scored(early, 0, timestamp_ms=10), 0, 3)]
    for row in (*late_rows, late_rows[0], *early_rows):
        store.add(row)
    store.summarize()
    assert store.duplicates == 1 and store.counts() == (1, 1)
    assert [s["conversation_id"] for s in store.conversations(False)] == [early, late]
    assert [s["conversation_id"] for s in store.conversations(True)] == [late]
    ordered = [(complete, row["message_id"]) for complete, row in store.messages(False)]
    assert ordered == [(False, early_rows[0]["message_id"])] + [
        (True, row["message_id"]) for row in late_rows
    ]
    store.close()


# --- the live dataset files ---


def test_dataset_files_write_each_conversation_once(tmp_path):
    files = ConversationFiles(tmp_path)
    files.open()
    one, two = rows_of(new_id(), [0.1, 0.2]), rows_of(new_id(), [0.3])
    assert files.append([one]) == 1
    assert files.append([one, two, two]) == 1  # a redelivered batch, a repeat in the batch
    reopened = ConversationFiles(tmp_path)
    reopened.open()
    assert reopened.append([one, two]) == 0
    lines = (tmp_path / "conversations.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert len((tmp_path / "messages.jsonl").read_text().splitlines()) == 3
    assert len((tmp_path / "chat.jsonl").read_text().splitlines()) == 2
    message = json.loads((tmp_path / "messages.jsonl").read_text().splitlines()[0])
    assert message["conversation_complete"] is True


def test_dataset_files_cut_off_a_torn_write(tmp_path):
    files = ConversationFiles(tmp_path)
    files.open()
    kept, torn = rows_of(new_id(), [0.1]), rows_of(new_id(), [0.2])
    files.append([kept])
    committed = (tmp_path / "messages.jsonl").read_bytes()
    with open(tmp_path / "messages.jsonl", "ab") as file:
        file.write(b'{"conversation_id": "' + torn[0]["conversation_id"].encode() + b'", "tu')
    reopened = ConversationFiles(tmp_path)
    reopened.open()
    assert (tmp_path / "messages.jsonl").read_bytes() == committed
    assert reopened.append([kept, torn]) == 1


def test_dataset_files_shared_by_two_writers_learn_each_others_conversations(tmp_path):
    first, second = ConversationFiles(tmp_path), ConversationFiles(tmp_path)
    first.open()
    second.open()
    rows = rows_of(new_id(), [0.1])
    assert first.append([rows]) == 1
    assert second.append([rows]) == 0


def test_dataset_files_refuse_a_folder_they_did_not_write(tmp_path):
    (tmp_path / "messages.jsonl").write_text('{"conversation_id": "x"}\n')
    with pytest.raises(RuntimeError, match="not written by dataset_sink"):
        ConversationFiles(tmp_path).open()


class FakeState:
    def __init__(self):
        self.data = {}

    def get(self, key, default=None):
        return self.data.get(key, default)

    def set(self, key, value, ttl=None):
        self.data[key] = value

    def delete(self, key):
        self.data.pop(key, None)


def test_conversation_is_handed_on_once_at_its_final_message():
    state = FakeState()
    rows = rows_of(new_id(), [0.1, 0.2, 0.3])
    assert collect_conversation(rows[0], state) is None
    assert collect_conversation(rows[0], state) is None  # redelivered
    assert collect_conversation(rows[1], state) is None
    done = collect_conversation(rows[2], state)
    assert [r["turn"] for r in done["rows"]] == [0, 1, 2]
    assert collect_conversation(rows[2], state) is None  # late repeat of the final message
    assert "rows" not in state.data


def test_a_written_or_abandoned_conversation_is_forgotten_a_retention_later(tmp_path):
    """In a real Quix Streams state store (RocksDB), in event time, as the aggregator's state."""
    retention = timedelta(hours=1)
    hour_ms = 3_600_000
    store = RocksDBStorePartition(str(tmp_path / "state"))

    def deliver(row: dict, at_ms: int) -> dict | None:
        transaction = store.begin()
        state = transaction.as_state(prefix=row["conversation_id"].encode(), timestamp=at_ms)
        out = collect_conversation(row, state, retention)
        transaction.prepare()
        transaction.flush()
        return out

    def kept(conversation_id: str, at_ms: int) -> set[str]:
        state = store.begin().as_state(prefix=conversation_id.encode(), timestamp=at_ms)
        return {key for key in ("rows", "done") if state.get(key) is not None}

    written, abandoned = rows_of(new_id(), [0.1, 0.2, 0.3]), rows_of(new_id(), [0.1, 0.2, 0.3])
    for turn, row in enumerate(written):
        deliver(row, 1000 + turn)
    deliver(abandoned[0], 1002)
    # event time only moves forward in a partition: both are read at the same times
    for conversation, before in [(written, {"done"}), (abandoned, {"rows"})]:
        assert kept(conversation[0]["conversation_id"], 1002 + hour_ms - 1) == before
    for conversation in (written, abandoned):
        assert kept(conversation[0]["conversation_id"], 1002 + hour_ms + 1) == set()
    store.close()


def test_dataset_sink_is_enabled_by_dataset_dir(monkeypatch):
    monkeypatch.delenv("DATASET_DIR", raising=False)
    assert "DATASET_DIR" in dataset_sink_enabled({})
    assert dataset_sink_enabled({"DATASET_DIR": "data/live"}) is None


# --- compare ---


def test_comparison_agreement_kappa_and_tables():
    result = Comparison(
        a="chat-scored",
        b="chat-scored-v2",
        confusion={
            ("negative", "negative"): 6,
            ("negative", "neutral"): 2,
            ("neutral", "neutral"): 3,
            ("positive", "positive"): 4,
            ("positive", "neutral"): 1,
        },
        only_a=1,
        only_b=3,
        models_a={"m1": 17},
        models_b={"m2": 19},
        mean_abs_score_diff=0.131,
    )
    assert result.both == 16 and result.agreed == 13
    # chance: (8*6 + 3*6 + 5*4) / 16**2 = 86/256
    assert result.kappa == pytest.approx((13 / 16 - 86 / 256) / (1 - 86 / 256))
    rows = {row["label"]: row for row in result.per_label()}
    assert rows["positive"] == {"label": "positive", "a": 5, "b": 4, "both": 4, "agreement": 8 / 9}
    text = result.render()
    assert "overall agreement: 81.2% (13/16)" in text
    assert "negative           6         2         0       8" in text
    assert "total              6         6         4      16" in text
    assert json.loads(json.dumps(result.to_json()))["confusion"]["positive"]["neutral"] == 1


def test_comparison_of_empty_topics_does_not_divide_by_zero():
    result = Comparison(a="x", b="y", confusion={})
    assert result.agreement is None and result.kappa is None
    assert "n/a" in result.render()


def test_csv_cells_that_a_spreadsheet_would_run_as_formulas_are_defused(tmp_path):
    texts = ['=HYPERLINK("http://evil","refund")', "+1 555", "-2+3", "@SUM(A1)", "\t=1", "ok"]
    path = tmp_path / "messages.csv"
    rows = CsvRows(path, ["text", "sentiment_score"])
    for text in texts:
        rows.write({"text": text, "sentiment_score": -0.5})
    rows.close()
    with open(path, newline="", encoding="utf-8") as file:
        read = list(csv.DictReader(file))
    assert [r["text"] for r in read] == ["'" + t for t in texts[:-1]] + ["ok"]
    assert {r["sentiment_score"] for r in read} == {"-0.5"}  # numbers stay numbers
