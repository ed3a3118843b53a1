"""The conversation protocol as pure logic: turns, duplicates, endings, replacements, errors."""

import random

import pytest

from supportsim.bots.conversation import (
    BotConfig,
    ConversationState,
    Reply,
    handle,
    opening_message,
)
from supportsim.bots.scripted import ScriptedResponder
from supportsim.contract.messages import ChatMessage
from supportsim.contract.protocol import slot_id, successor_id


class FixedOpening:
    """A scenario with one persona, so assertions can name it."""

    def open(self, conversation_id, rng: random.Random):
        mood = rng.choice(["angry", "calm", "confused"])
        return {"name": "Ada", "mood": mood, "product": "kettle"}, {"name": "Sam"}, "Hello!"


class FailingResponder:
    model_name = "broken"

    def respond(self, role, conversation):
        raise RuntimeError("model crashed")


class LoopingResponder:
    model_name = "loop"

    def respond(self, role, conversation):
        return Reply(text="same again", loop=True)


OPENING = FixedOpening()


def play(config, responder, messages, state=None):
    outs = []
    for message in messages:
        outcome = handle(state, message, config, responder, OPENING)
        state = outcome.state
        outs.append(outcome)
    return state, outs


def reply_to(message: ChatMessage, role, text="reply", **fields) -> ChatMessage:
    data = message.model_dump()
    data.update(
        turn=message.turn + 1, role=role, text=text, message_id=slot_id("m", message.turn + 99)
    )
    data.update(fields)
    return ChatMessage.model_validate(data)


def test_customer_answers_the_greeting_with_the_next_turn_and_same_persona():
    greeting = opening_message(slot_id("t", 0), OPENING)
    state, (outcome,) = play(BotConfig("customer"), ScriptedResponder(), [greeting])
    (reply,) = outcome.messages
    assert (reply.turn, reply.role) == (1, "customer")
    assert reply.customer == greeting.customer and reply.agent == greeting.agent
    assert state.last_turn == 1 and [h["turn"] for h in state.history] == [0, 1]


def test_agent_remembers_its_own_greeting_without_answering_it():
    greeting = opening_message(slot_id("t", 1), OPENING)
    state, (outcome,) = play(BotConfig("agent"), ScriptedResponder(), [greeting])
    assert outcome.messages == [] and state.last_turn == 0


def test_duplicate_delivery_gets_exactly_one_reply():
    greeting = opening_message(slot_id("t", 2), OPENING)
    state, outs = play(BotConfig("customer"), ScriptedResponder(), [greeting, greeting])
    assert len(outs[0].messages) == 1 and outs[1].messages == [] and outs[1].dead_letters == []


def test_out_of_order_and_unknown_conversation_turns_are_dead_letters():
    greeting = opening_message(slot_id("t", 3), OPENING)
    config = BotConfig("customer")
    _, (unknown,) = play(config, ScriptedResponder(), [reply_to(greeting, "customer")])
    assert "unknown conversation" in unknown.dead_letters[0].error
    state, _ = play(config, ScriptedResponder(), [greeting])
    jump = reply_to(reply_to(reply_to(greeting, "customer"), "agent"), "customer")
    jump = reply_to(jump, "agent")
    _, (skipped,) = play(config, ScriptedResponder(), [jump], state)
    assert "out-of-order turn 4: expected turn 2" in skipped.dead_letters[0].error


def test_turn_limit_ends_the_conversation_and_starts_its_replacement():
    config = BotConfig("customer", max_turns=4)
    greeting = opening_message(slot_id("t", 4), OPENING)
    state, (first,) = play(config, ScriptedResponder(), [greeting])
    agent_line = reply_to(first.messages[0], "agent")
    state, (second,) = play(config, ScriptedResponder(), [agent_line], state)
    final, replacement = second.messages
    assert final.final and final.end_reason == "turn_limit" and final.turn == 3
    assert replacement.conversation_id == successor_id(greeting.conversation_id)
    assert (replacement.turn, replacement.role) == (0, "agent")
    assert state.ended and state.to_state()["history"] == []


def test_customer_goodbye_ends_with_goodbye():
    config = BotConfig("customer")
    greeting = opening_message(slot_id("t", 5), OPENING)
    state, _ = play(config, ScriptedResponder(goodbye_after=1), [greeting])
    assert state.ended and state.end_reason == "goodbye"


def test_model_failure_ends_with_error_and_replacement():
    greeting = opening_message(slot_id("t", 6), OPENING)
    state, (outcome,) = play(BotConfig("customer"), FailingResponder(), [greeting])
    final, replacement = outcome.messages
    assert final.final and final.end_reason == "error" and "RuntimeError" in final.text
    assert replacement.turn == 0 and replacement.conversation_id != greeting.conversation_id


def test_persistent_loop_ends_with_loop():
    greeting = opening_message(slot_id("t", 7), OPENING)
    _, (outcome,) = play(BotConfig("customer"), LoopingResponder(), [greeting])
    assert outcome.messages[0].end_reason == "loop"


def test_messages_after_the_end_are_dead_letters_but_repeats_are_ignored():
    config = BotConfig("agent")
    greeting = opening_message(slot_id("t", 8), OPENING)
    final = reply_to(greeting, "customer", final=True, end_reason="goodbye")
    state, _ = play(config, ScriptedResponder(), [greeting, final])
    assert state.ended
    _, (again,) = play(config, ScriptedResponder(), [final], state)
    assert again.messages == [] and again.dead_letters == []
    _, (late,) = play(config, ScriptedResponder(), [reply_to(final, "agent")], state)
    assert "after the conversation ended" in late.dead_letters[0].error


@pytest.mark.parametrize("slot", range(5))
def test_personas_are_per_conversation_and_reproducible(slot):
    first = opening_message(slot_id("ns", slot), OPENING)
    again = opening_message(slot_id("ns", slot), OPENING)
    assert first.customer == again.customer and first.message_id == again.message_id


def test_state_round_trips_as_plain_data():
    greeting = opening_message(slot_id("t", 9), OPENING)
    state, _ = play(BotConfig("customer"), ScriptedResponder(), [greeting])
    stored = state.to_state()
    assert ConversationState.from_state(stored) == state
