"""Prompt reuse with the real SmolLM2 model: each conversation's prompt is read once per process.

A bot process interleaves conversations; with reuse each turn reads only what was added since
that conversation's previous turn, the retry of a turn only its new reminder, and the saved
states stay inside their memory bound, the least recently used conversation evicted first.
"""

from __future__ import annotations

import random

import pytest
from langchain_core.messages import SystemMessage

from supportsim.bots.conversation import ConversationState
from supportsim.bots.llm import ChatLLM, LLMConfig
from supportsim.bots.memory import chat_messages
from supportsim.bots.prompts import Scenario
from supportsim.bots.turns import LLMResponder

pytest.importorskip("llama_cpp", reason="the bots extra (llama-cpp-python) is not installed")

N_CTX = 1024


def load(cache_mb: int) -> ChatLLM:
    return ChatLLM.load(
        LLMConfig(
            model="smollm2-135m",
            n_ctx=N_CTX,
            max_tokens=32,
            n_threads=2,
            seed=11,
            prompt_cache_mb=cache_mb,
        )
    )


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return Scenario.load("electronics")


def conversations(scenario: Scenario, count: int) -> list[ConversationState]:
    states = []
    for index in range(count):
        customer, agent, greeting, extra = scenario.open(f"c{index}", random.Random(index))
        state = ConversationState(f"c{index}", customer=customer, agent=agent, **extra)
        state.history.append({"turn": 0, "role": "agent", "text": greeting})
        states.append(state)
    return states


def interleave(llm: ChatLLM, scenario: Scenario, states, rounds: int) -> list[tuple[str, object]]:
    """Each conversation's customer turn, then its agent turn, the conversations taking turns."""
    responder = LLMResponder(llm, scenario)
    replies = []
    for _ in range(rounds):
        for state in states:
            for role in ("customer", "agent"):
                reply = responder.respond(role, state)
                line = {"turn": len(state.history), "role": role, "text": reply.text}
                # as the bots keep it: their own structured line as the model wrote it
                structured = reply.decision is not None
                state.history.append({**line, "raw": reply.raw_text if structured else ""})
                replies.append((state.conversation_id, reply))
    return replies


def test_interleaved_conversations_read_only_their_new_tokens(scenario):
    with_reuse = interleave(load(64), scenario, conversations(scenario, 2), rounds=2)
    without = interleave(load(0), scenario, conversations(scenario, 2), rounds=2)
    later = with_reuse[4:]  # after each conversation's first turn of each side
    assert all(r.evaluated_prompt_tokens is not None for _, r in with_reuse)
    assert all(0 < r.evaluated_prompt_tokens <= r.prompt_tokens for _, r in with_reuse)
    # each later turn reads a small part of its prompt: the lines added since its last turn
    assert all(r.evaluated_prompt_tokens < r.prompt_tokens / 2 for _, r in later), [
        (r.evaluated_prompt_tokens, r.prompt_tokens) for _, r in later
    ]
    # without saved states another conversation's context sits in the model: all is read again
    # (a retry reuses its first attempt's prompt, so only single attempts are compared)
    first_tries = [r for _, r in without[4:] if r.attempts == 1]
    assert first_tries
    assert all(r.evaluated_prompt_tokens > 0.8 * r.prompt_tokens for r in first_tries)


def test_a_retried_turn_reads_only_its_new_reminder(scenario):
    llm = load(64)
    history = [
        {"role": "agent", "text": "Hello, this is Sam. How can I help?"},
        {"role": "customer", "text": "My laptop will not charge since yesterday."},
    ]
    base = chat_messages(scenario.system_prompt("agent", _persona(scenario)), history, "agent")
    first = llm.reply([*base, SystemMessage(content="(Reply as Sam.)")], conversation="x/agent")
    retry_cue = SystemMessage(content="(Reply as Sam, with something you have not said yet.)")
    retry = llm.reply([*base, retry_cue], conversation="x/agent", temperature=1.1)
    assert first.evaluated_prompt_tokens == first.prompt_tokens
    # the reminder and the assistant header, not the system prompt and history again
    assert retry.evaluated_prompt_tokens <= llm.count_tokens([retry_cue]) + 4


def test_saved_states_stay_inside_their_bound_evicting_the_least_recent(scenario):
    llm = load(64)
    states = conversations(scenario, 3)
    responder = LLMResponder(llm, scenario)
    responder.respond("customer", states[0])
    cache = llm.states
    assert cache is not None and cache.conversations == 1
    # room for two states of this size, not three
    cache.capacity_bytes = int(cache.cache_size * 2.5)
    for state in states[1:]:
        responder.respond("customer", state)
    assert cache.conversations == 2 and cache.cache_size <= cache.capacity_bytes
    # the live context holds the newest; the one before comes back from its saved state
    kept = responder.respond("customer", states[1])
    assert kept.evaluated_prompt_tokens <= 4
    # the oldest was evicted: only the instructions every conversation shares are in the live
    # context, so its own part (persona, greeting, reminder) is read again
    evicted = responder.respond("customer", states[0])
    assert evicted.evaluated_prompt_tokens > 12 * kept.evaluated_prompt_tokens


def _persona(scenario: Scenario):
    return scenario.draw_persona(random.Random(5))
