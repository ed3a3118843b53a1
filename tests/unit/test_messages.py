"""The message contract: valid messages parse, every kind of bad value becomes a dead letter."""

import base64
import json

import pytest

from supportsim.contract.messages import (
    MAX_TEXT_CHARS,
    ChatMessage,
    DeadLetter,
    ScoredMessage,
    parse_chat,
    parse_scored,
)
from tests.support import chat_message

WHERE = {"service": "test", "source_topic": "chat", "partition": 2, "offset": 41}


def raw(message) -> bytes:
    return json.dumps(message).encode()


def test_valid_message_parses_with_all_fields():
    message = chat_message(turn=3, final=True, end_reason="goodbye")
    parsed = parse_chat(raw(message), key=message["conversation_id"].encode(), **WHERE)
    assert isinstance(parsed, ChatMessage)
    assert parsed.turn == 3 and parsed.role == "agent" and parsed.final
    assert parsed.end_reason == "goodbye"
    assert parsed.customer.mood == "angry"
    assert parsed.key == message["conversation_id"].encode()


def test_added_fields_pass_through_unchanged():
    message = chat_message(trace_id="abc")
    parsed = parse_chat(raw(message), **WHERE)
    assert isinstance(parsed, ChatMessage)
    assert parsed.model_dump(mode="json")["trace_id"] == "abc"


def test_scored_message_needs_sentiment_in_range():
    message = chat_message(sentiment={"label": "neutral", "score": 0.1, "model": "m"})
    assert isinstance(parse_scored(raw(message), **WHERE), ScoredMessage)
    message["sentiment"]["score"] = 1.5
    bad = parse_scored(raw(message), **WHERE)
    assert isinstance(bad, DeadLetter) and "sentiment.score" in bad.error
    del message["sentiment"]
    assert isinstance(parse_scored(raw(message), **WHERE), DeadLetter)


@pytest.mark.parametrize(
    "value, reason",
    [
        (b"{not json", "not JSON"),
        (b"[1, 2, 3]", "expected an object"),
        (b'"just a string"', "expected an object"),
        (
            raw({k: v for k, v in chat_message().items() if k != "conversation_id"}),
            "conversation_id",
        ),
        (raw(chat_message(turn="3")), "turn"),
        (raw(chat_message(turn=-1)), "turn"),
        (raw(chat_message(final="yes")), "final"),
        (raw(chat_message(role="manager")), "role"),
        (raw(chat_message(text="x" * (MAX_TEXT_CHARS + 1))), "text"),
        (raw(chat_message(conversation_id="not-a-uuid")), "conversation_id"),
        (raw(chat_message(customer={"name": "A"})), "customer.mood"),
        (b"\xff\xfe\x00bad", "not valid UTF-8"),
        (None, "empty value"),
    ],
)
def test_bad_values_become_dead_letters_with_reason(value, reason):
    result = parse_chat(value, key=b"k", **WHERE)
    assert isinstance(result, DeadLetter)
    assert reason in result.error
    assert (result.source_topic, result.partition, result.offset) == ("chat", 2, 41)
    assert result.service == "test"


def test_invalid_utf8_is_kept_as_base64():
    value = b"\xff\xfe\x00bad"
    result = parse_chat(value, **WHERE)
    assert result.value_encoding == "base64"
    assert base64.b64decode(result.value) == value


def test_key_must_match_conversation_id():
    message = chat_message()
    result = parse_chat(raw(message), key=b"another-key", **WHERE)
    assert isinstance(result, DeadLetter) and "does not match" in result.error


def test_huge_value_is_truncated_in_the_dead_letter():
    value = raw(chat_message(text="y" * 1_000_000))
    result = parse_chat(value, **WHERE)
    assert isinstance(result, DeadLetter) and "text" in result.error
    assert len(result.value) < 100_000
