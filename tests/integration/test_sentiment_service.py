"""The sentiment_analysis service as a real process, through the real broker, with the real model.

Every check reads `chat-scored` back and compares it with what was produced to `chat`. message_id
is the idempotency key of the contract: a consumer keeps the first copy of each. Tansu (the
test broker) shows records of aborted and unfinished transactions to read_committed consumers,
so after a kill -9 a batch can appear twice in `chat-scored`; the tests therefore compare sets of
message_ids, require every copy of a message to be the same, and print the raw duplicate count.
"""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from supportsim.contract.messages import MAX_TEXT_CHARS, new_id
from supportsim.kafka.app import make_app
from supportsim.kafka.reader import TopicReader
from supportsim.local.processes import REPO_ROOT
from supportsim.sentiment.model import BUILTIN_NAME, load_examples
from supportsim.sentiment.service import SentimentSettings
from supportsim.settings import KafkaSettings
from tests.support import ServiceProcess, chat_message, produce, produce_json, read_topic, values

SERVICE = "sentiment_analysis"
LABELS = {"positive", "neutral", "negative"}

# written for these tests (not in the training data), one clear label each
CLEAR = {
    "negative": [
        "This is the third replacement that broke in a week and I am absolutely fed up.",
        "Nobody has answered my emails for ten days. This is unacceptable.",
    ],
    "positive": [
        "Thank you so much, the new router works perfectly and I'm really happy!",
        "Brilliant, that fixed it. You've been a great help today.",
    ],
    "neutral": [
        "My order number is 88213-B and I bought it on the fourth of March.",
        "Could you tell me which address the return label should be sent to?",
    ],
}


@pytest.fixture
def topics(service_env, broker) -> SentimentSettings:
    """The test's settings, with its topics created as the service creates them."""
    settings = SentimentSettings()
    make_app(settings, group="sentiment-test-setup", exactly_once=False)
    return settings


def conversations(count: int, turns: int, seed: int = 7) -> list[dict]:
    """`count` conversations of `turns` messages with dataset texts, interleaved turn by turn.

    Each message carries a field the contract does not know, which must pass through untouched.
    """
    rng = random.Random(seed)
    texts = [e.text for e in load_examples("train") + load_examples("test")]
    ids = [new_id() for _ in range(count)]
    return [
        chat_message(cid, turn=turn, text=rng.choice(texts), channel=f"web-{index % 3}")
        for turn in range(turns)
        for index, cid in enumerate(ids)
    ]


def first_copies(scored: list[dict]) -> dict[str, dict]:
    """The first copy of each message_id, as an idempotent consumer keeps them."""
    kept: dict[str, dict] = {}
    for message in scored:
        kept.setdefault(message["message_id"], message)
    return kept


def read_scored(
    broker: str, topic: str, expected: set[str], timeout: float, service: ServiceProcess
) -> list[dict]:
    """Read `topic` from the start until every expected message_id is there.

    Gives up at `timeout`, or as soon as the service has died.
    """
    seen: set[str] = set()
    parsed = [0]  # records whose message_id is in `seen`

    def done(records: list) -> bool:
        seen.update(json.loads(r.value())["message_id"] for r in records[parsed[0] :])
        parsed[0] = len(records)
        return expected <= seen or not service.alive()

    return values(read_topic(broker, topic, until=done, timeout=timeout))


def check_scored(sent: list[dict], scored: list[dict]) -> None:
    """Exactly one message per valid input (by message_id), in order, complete and scored."""
    by_id = {m["message_id"]: m for m in sent}
    kept = first_copies(scored)
    assert set(kept) == set(by_id), (
        f"missing {len(set(by_id) - set(kept))}, extra {len(set(kept) - set(by_id))}"
    )
    assert len(kept) == len(sent)
    for message in scored:
        first = kept[message["message_id"]]
        # a repeated copy is the same message with the same sentiment; the score may differ in
        # the last float bits because the repeat went through the model in a different batch
        assert {k: v for k, v in message.items() if k != "sentiment"} == {
            k: v for k, v in first.items() if k != "sentiment"
        }
        assert message["sentiment"]["label"] == first["sentiment"]["label"]
        assert message["sentiment"]["model"] == first["sentiment"]["model"]
        assert message["sentiment"]["score"] == pytest.approx(first["sentiment"]["score"], abs=1e-4)
    for message_id, message in kept.items():
        assert {k: v for k, v in message.items() if k != "sentiment"} == by_id[message_id]
        sentiment = message["sentiment"]
        assert set(sentiment) == {"label", "score", "model"}
        assert sentiment["label"] in LABELS
        assert -1.0 <= sentiment["score"] <= 1.0
        assert sentiment["model"].startswith(f"{BUILTIN_NAME}@")
    # per conversation, turns come out in the order they went in
    turns: dict[str, list[int]] = defaultdict(list)
    for message in kept.values():
        turns[message["conversation_id"]].append(message["turn"])
    for conversation_id, seen in turns.items():
        assert seen == sorted(seen), (conversation_id, seen)


def check_clean_exit(service: ServiceProcess) -> None:
    """After SIGTERM the service finished its batch, logged its totals and exited with 0."""
    assert service.process.returncode == 0, service.log()[-3000:]
    assert "stopped after scoring" in service.log()


def test_every_message_is_scored_once_in_order_with_all_fields(
    topics, service_env, broker, tmp_path
):
    sent = conversations(count=8, turns=12)
    produce_json(broker, topics.chat_topic, sent)
    service = ServiceProcess(SERVICE, service_env, tmp_path).start()
    try:
        scored = read_scored(
            broker, topics.scored_topic, {m["message_id"] for m in sent}, 120, service
        )
        assert service.alive(), service.log()[-3000:]
    finally:
        service.stop()
    check_clean_exit(service)
    print(f"\n{len(sent)} sent, {len(scored)} scored records, {len(first_copies(scored))} unique")
    check_scored(sent, scored)
    assert len({m["sentiment"]["model"] for m in scored}) == 1
    # the scored message is keyed by its conversation, like the input
    records = read_topic(broker, topics.scored_topic, until=len(sent), timeout=30)
    assert all(r.key() == json.loads(r.value())["conversation_id"].encode() for r in records)
    assert f"model {BUILTIN_NAME}@" in service.log()


def test_kill_9_mid_stream_loses_and_adds_nothing(topics, service_env, broker, tmp_path):
    sent = conversations(count=20, turns=30, seed=11)
    produce_json(broker, topics.chat_topic, sent)
    expected = {m["message_id"] for m in sent}
    # offsets written so far (records, committed or not, and transaction markers), read fast:
    # the offset query alone, which on Tansu moves with each new batch (see kafka.reader)
    kafka = KafkaSettings(broker_address=broker)
    with TopicReader(kafka=kafka, isolation="read_uncommitted", purpose="marks") as marks:

        def offsets() -> int:
            return sum(marks.end_offsets(topics.scored_topic).values())

        first = ServiceProcess(SERVICE, service_env, tmp_path).start()
        try:
            deadline = time.monotonic() + 120
            written = 0
            while written < 64:  # two batches out, the rest still to come
                assert time.monotonic() < deadline, first.log()[-3000:]
                assert first.alive(), first.log()[-3000:]
                time.sleep(0.05)
                written = offsets()
            # kill the moment the next batch's records reach the broker: most likely before its
            # transaction commits, the case where Tansu shows them and the batch runs again
            while offsets() == written and time.monotonic() < deadline:
                pass
        finally:
            first.kill()
        at_kill = offsets()
    print(f"\nkilled at {at_kill} of ~{len(sent)} offsets written (was {written} before)")
    assert at_kill < len(sent), "the service finished before the kill: nothing was tested"
    second = ServiceProcess(SERVICE, service_env, tmp_path).start()
    try:
        scored = read_scored(broker, topics.scored_topic, expected, 150, second)
    finally:
        second.stop()
    check_clean_exit(second)
    unique = len(first_copies(scored))
    print(
        f"{len(sent)} sent, {len(scored)} scored records, {unique} unique message_ids, "
        f"{len(scored) - unique} duplicates (records of the killed batch that Tansu shows)"
    )
    check_scored(sent, scored)
    assert unique == len(sent)


def test_bad_input_goes_to_dead_letters_and_scoring_goes_on(topics, service_env, broker, tmp_path):
    cid = new_id()
    key = cid.encode()
    valid_before = [chat_message(cid, turn=0, text="Hi, my laptop will not turn on.")]
    no_conversation = chat_message(cid, turn=1)
    del no_conversation["conversation_id"]
    bad = {
        "not JSON": b"{this is not json",
        "missing conversation_id": json.dumps(no_conversation).encode(),
        "unknown role": json.dumps(chat_message(cid, turn=1, role="manager")).encode(),
        "oversize text": json.dumps(
            chat_message(cid, turn=1, text="x" * (MAX_TEXT_CHARS + 1))
        ).encode(),
        "invalid UTF-8": b'{"text": "caf\xe9 \xff\xfe"}',
    }
    valid_after = [
        chat_message(cid, turn=turn, text=text)
        for turn, text in enumerate(
            ["I'm still waiting for an answer.", "Thanks, that worked!"], start=1
        )
    ]
    produce_json(broker, topics.chat_topic, valid_before)
    produce(broker, topics.chat_topic, [(key, value) for value in bad.values()])
    produce_json(broker, topics.chat_topic, valid_after)
    service = ServiceProcess(SERVICE, service_env, tmp_path).start()
    try:
        sent = valid_before + valid_after
        scored = read_scored(
            broker, topics.scored_topic, {m["message_id"] for m in sent}, 120, service
        )
        dead = values(read_topic(broker, topics.dead_letter_topic, until=len(bad), timeout=30))
        assert service.alive(), service.log()[-3000:]
    finally:
        service.stop()
    check_clean_exit(service)
    check_scored(sent, scored)
    # one conversation, one partition: the bad records sit between the valid ones
    offsets = sorted(d["offset"] for d in dead)
    assert len(dead) == len(bad), dead
    assert offsets == list(range(1, 1 + len(bad)))
    by_offset = {d["offset"]: d for d in dead}
    reasons = {
        "not JSON": "value is not JSON",
        "missing conversation_id": "conversation_id: Field required",
        "unknown role": "role: Input should be 'customer' or 'agent'",
        "oversize text": f"text: String should have at most {MAX_TEXT_CHARS} characters",
        "invalid UTF-8": "not valid UTF-8",
    }
    for offset, (what, raw) in enumerate(bad.items(), start=1):
        letter = by_offset[offset]
        assert reasons[what] in letter["error"], (what, letter["error"])
        assert letter["source_topic"] == topics.chat_topic
        assert letter["key"] == cid
        assert letter["service"] == SERVICE
        assert letter["partition"] == by_offset[1]["partition"]
        if letter["value_encoding"] == "base64":
            assert base64.b64decode(letter["value"]) == raw
        else:
            assert letter["value"].encode() == raw
    assert by_offset[5]["value_encoding"] == "base64"
    assert service.log().count("dead letter") >= len(bad)


def test_clear_messages_get_the_right_labels_through_the_service(
    topics, service_env, broker, tmp_path
):
    cid = new_id()
    texts = [(label, text) for label, group in CLEAR.items() for text in group]
    sent = [chat_message(cid, turn=turn, text=text) for turn, (_, text) in enumerate(texts)]
    produce_json(broker, topics.chat_topic, sent)
    service = ServiceProcess(SERVICE, service_env, tmp_path).start()
    try:
        scored = read_scored(
            broker, topics.scored_topic, {m["message_id"] for m in sent}, 120, service
        )
    finally:
        service.stop()
    check_clean_exit(service)
    check_scored(sent, scored)
    kept = first_copies(scored)
    for message, (label, text) in zip(sent, texts, strict=True):
        sentiment = kept[message["message_id"]]["sentiment"]
        assert sentiment["label"] == label, (text, sentiment)
        if label == "positive":
            assert sentiment["score"] > 0.5, (text, sentiment)
        elif label == "negative":
            assert sentiment["score"] < -0.5, (text, sentiment)
        else:
            assert abs(sentiment["score"]) < 0.5, (text, sentiment)


def test_score_command_answers_each_line_with_label_and_score(tmp_path):
    lines = [text for group in CLEAR.values() for text in group]
    lines.append(json.dumps({"text": "Where is my parcel?", "order": 12}))
    source = tmp_path / "messages.txt"
    source.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    with open(source) as stdin:
        result = subprocess.run(
            [str(Path(sys.executable).parent / "supportsim"), "score"],
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
        )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len(lines)  # the blank line gets no answer
    expected = [(label, text) for label, group in CLEAR.items() for text in group]
    expected.append(("neutral", "Where is my parcel?"))
    for row, (label, text) in zip(rows, expected, strict=True):
        assert row["text"] == text
        assert row["label"] == label, row
        assert -1.0 <= row["score"] <= 1.0


def test_an_already_scored_message_is_scored_again(topics, service_env, broker, tmp_path):
    """Re-scoring (CHAT_TOPIC pointed at a scored topic) replaces the old sentiment; a contract
    message may carry fields the contract does not name, `sentiment` among them."""
    cid = new_id()
    old = {"label": "positive", "score": 0.9, "model": "old-model"}
    sent = [
        chat_message(cid, turn=0, text="This is unacceptable, I want a refund now.", sentiment=old),
        chat_message(cid, turn=1, text="Thanks, that worked!"),
    ]
    produce_json(broker, topics.chat_topic, sent)
    service = ServiceProcess(SERVICE, service_env, tmp_path).start()
    try:
        scored = read_scored(
            broker, topics.scored_topic, {m["message_id"] for m in sent}, 60, service
        )
        assert service.alive(), service.log()[-3000:]
    finally:
        service.stop()
    kept = first_copies(scored)
    assert set(kept) == {m["message_id"] for m in sent}, service.log()[-3000:]
    rescored = kept[sent[0]["message_id"]]["sentiment"]
    assert rescored["model"] != "old-model"
    assert rescored["label"] == "negative"
