"""Through the real broker: which processing errors are dead-lettered and which stop a service.

A bad input (a `ValueError`: pydantic's ValidationError, a protocol violation, ...) is
dead-lettered and the service goes on; any other exception is a bug, and the service stops with
it instead of quietly dead-lettering every message it touches.
"""

import pytest

from supportsim.contract.messages import ChatMessage
from supportsim.kafka.app import make_app
from supportsim.kafka.dead_letters import validated
from supportsim.settings import ServiceSettings
from tests.support import chat_message, produce_json, read_topic, values


def judge(value: dict) -> dict:
    if value["text"] == "bad input":
        raise ValueError("this message breaks a rule of the protocol")
    if value["text"] == "bug":
        raise AttributeError("'NoneType' object has no attribute 'turn'")
    return value


def run(settings, messages, broker):
    app, topics = make_app(settings, group="errors")
    produce_json(broker, settings.chat_topic, messages)
    sdf = validated(app.dataframe(topics.chat), ChatMessage, topics, "errors").apply(judge)
    sdf.to_topic(topics.scored)
    app.run(count=len(messages), timeout=60)


def test_bad_input_is_dead_lettered_and_the_rest_goes_on(service_env, broker):
    settings = ServiceSettings()
    messages = [chat_message(text="fine"), chat_message(text="bad input"), chat_message()]
    run(settings, messages, broker)
    forwarded = values(read_topic(broker, settings.scored_topic, until=2))
    assert {m["message_id"] for m in forwarded} == {
        messages[0]["message_id"],
        messages[2]["message_id"],
    }
    dead = values(read_topic(broker, settings.dead_letter_topic, until=1))
    assert [d["error"] for d in dead] == ["ValueError: this message breaks a rule of the protocol"]


def test_a_programming_error_stops_the_service_and_is_not_dead_lettered(service_env, broker):
    settings = ServiceSettings()
    with pytest.raises(AttributeError, match="no attribute 'turn'"):
        run(settings, [chat_message(text="bug")], broker)
    assert read_topic(broker, settings.dead_letter_topic, until=1, timeout=5) == []
