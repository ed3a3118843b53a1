"""Structured turns: the end of a conversation, its outcome and the remedy come from data."""

from __future__ import annotations

import json
import random

import pytest
from langchain_core.messages import BaseMessage

from supportsim.bots.conversation import BotConfig, handle, opening_message
from supportsim.bots.decisions import (
    MalformedDecisionError,
    decision_schema,
    parse_decision,
)
from supportsim.bots.llm import Completion, LLMConfig
from supportsim.bots.prompts import Scenario
from supportsim.bots.turns import LLMResponder, attempt_seed, generate_turn
from supportsim.contract.protocol import slot_id

SCENARIO = Scenario.load("electronics")
REMEDIES = SCENARIO.remedies


class JsonModel:
    """A stand-in model that answers each call with the next scripted raw output."""

    def __init__(self, outputs: list[str], retries: int = 2) -> None:
        self.config = LLMConfig(model="smollm2-135m", retries=retries)
        self.max_prompt_tokens = 1500
        self.model_name = "json-model"
        self.outputs = list(outputs)
        self.schemas: list[dict | None] = []
        self.seeds: list[int | None] = []
        self.prompts: list[list[BaseMessage]] = []

    def count_tokens(self, messages: list[BaseMessage]) -> int:
        return sum(len(str(m.content).split()) + 4 for m in messages)

    def reply(self, messages, *, schema=None, seed=None, **_):
        self.schemas.append(schema)
        self.seeds.append(seed)
        self.prompts.append(messages)
        return Completion(self.outputs.pop(0), prompt_tokens=50, completion_tokens=9, latency_ms=3)


def customer_says(text: str, decision: str) -> str:
    return json.dumps({"reply": text, "decision": decision})


def agent_says(text: str, remedy: str = "none", ends_chat: bool = False) -> str:
    return json.dumps({"reply": text, "remedy": remedy, "ends_chat": ends_chat})


def play(outputs: dict[str, list[str]], max_turns: int = 12):
    """A whole conversation through the bots' own protocol; returns the messages written."""
    responders = {
        role: LLMResponder(JsonModel(outputs[role]), SCENARIO, structured=True)
        for role in ("customer", "agent")
    }
    configs = {role: BotConfig(role=role, max_turns=max_turns) for role in responders}
    states: dict = {"customer": None, "agent": None}
    queue = [opening_message(slot_id("structured", 0), SCENARIO)]
    written = []
    while queue:
        message = queue.pop(0)
        written.append(message)
        if message.final:
            break
        for role in ("customer", "agent"):
            outcome = handle(states[role], message, configs[role], responders[role], SCENARIO)
            states[role] = outcome.state
            queue += [m for m in outcome.messages if m.conversation_id == message.conversation_id]
    return written, responders


def test_the_customer_decides_first_and_the_agent_labels_its_reply_after():
    customer = decision_schema("customer", REMEDIES)
    assert list(customer["properties"]) == ["decision", "reply"]
    agent = decision_schema("agent", REMEDIES)
    assert agent["properties"]["remedy"]["enum"] == ["none", *REMEDIES]
    assert agent["required"] == ["reply", "remedy", "ends_chat"]


def test_a_customer_cannot_accept_before_a_remedy_nor_give_up_in_its_first_line():
    persona = SCENARIO.draw_persona(random.Random(5))
    greeting = [{"role": "agent", "text": "Hello, how can I help?"}]
    model = JsonModel([customer_says("My laptop is broken.", "continue")])
    generate_turn(model, SCENARIO, persona, "customer", greeting, structured=True)
    assert model.schemas[0]["properties"]["decision"]["enum"] == ["continue"]
    later = [
        *greeting,
        {"role": "customer", "text": "It is broken."},
        {"role": "agent", "text": "Please restart it."},
        {"role": "customer", "text": "I did."},
        {"role": "agent", "text": "I can send a replacement.", "remedy": "replacement"},
    ]
    wanted = persona.card.accepts[0]
    later[-1] = {**later[-1], "remedy": wanted}
    model = JsonModel([customer_says("Good.", "accept")])
    generate_turn(model, SCENARIO, persona, "customer", later, structured=True)
    assert model.schemas[0]["properties"]["decision"]["enum"] == ["continue", "accept", "give_up"]


def test_a_customer_holds_out_for_what_it_wants_until_its_patience_is_spent():
    persona = SCENARIO.draw_persona(random.Random(5))
    unwanted = next(r for r in REMEDIES if r not in persona.card.accepts)
    lines = [{"role": "agent", "text": "Hello, how can I help?"}]
    for turn in range(persona.card.patience):
        lines.append({"role": "customer", "text": f"Still broken ({turn})."})
        lines.append({"role": "agent", "text": "Here is an offer.", "remedy": unwanted})
    choices = []
    for spoken in range(1, persona.card.patience + 1):
        model = JsonModel([customer_says("Hmm.", "continue")])
        generate_turn(
            model, SCENARIO, persona, "customer", lines[: 2 * spoken + 1], structured=True
        )
        choices.append("accept" in model.schemas[0]["properties"]["decision"]["enum"])
    assert choices == [False] * (persona.card.patience - 1) + [True]
    # its patience spent, it takes what is offered or leaves: it does not go on
    assert model.schemas[0]["properties"]["decision"]["enum"] == ["accept", "give_up"]
    model = JsonModel([customer_says("I give up.", "give_up")])
    nothing_offered = [{k: v for k, v in line.items() if k != "remedy"} for line in lines]
    generate_turn(model, SCENARIO, persona, "customer", nothing_offered, structured=True)
    assert model.schemas[0]["properties"]["decision"]["enum"] == ["give_up"]


def test_a_customer_that_accepts_ends_the_chat_resolved_with_the_remedy_offered():
    written, _ = play(
        {
            "customer": [
                customer_says("My laptop screen flickers. Order NW-123456.", "continue"),
                customer_says("A replacement works for me. Thanks, bye!", "accept"),
            ],
            "agent": [agent_says("I can send a replacement today.", "replacement")],
        }
    )
    last = written[-1]
    assert [m.role for m in written] == ["agent", "customer", "agent", "customer"]
    assert written[2].remedy == "replacement"
    assert last.final and last.end_reason == "goodbye" and last.outcome == "resolved"
    assert last.remedy == "replacement"
    assert last.text == "A replacement works for me. Thanks, bye!"  # the text, never the JSON


def test_a_customer_that_gives_up_ends_the_chat_gave_up():
    written, _ = play(
        {
            "customer": [
                customer_says("It is broken.", "continue"),
                customer_says("I'm done with you people.", "give_up"),
            ],
            "agent": [agent_says("We will look into it.")],
        }
    )
    assert written[-1].outcome == "gave_up" and written[-1].remedy is None


def test_farewell_words_alone_do_not_end_a_structured_chat():
    written, _ = play(
        {
            "customer": [
                customer_says(
                    "Goodbye is what I'd like to say, but it's still broken.", "continue"
                ),
                customer_says("Fine, bye.", "accept"),
            ],
            "agent": [agent_says("Could you send the order number?")],
        }
    )
    assert len(written) == 4 and written[1].final is False


def test_a_turn_limit_leaves_the_conversation_unresolved():
    written, _ = play(
        {
            "customer": [customer_says(f"Still broken, try {i}.", "continue") for i in range(3)],
            "agent": [agent_says(f"Let me check, step {i}.") for i in range(3)],
        },
        max_turns=4,
    )
    assert written[-1].end_reason == "turn_limit" and written[-1].outcome == "unresolved"


def test_an_agent_that_closes_after_a_remedy_leaves_it_resolved():
    written, _ = play(
        {
            "customer": [
                customer_says("It is broken.", "continue"),
                customer_says("OK then.", "continue"),
            ],
            "agent": [
                agent_says("A refund is on its way.", "refund"),
                agent_says("Thank you, goodbye!", ends_chat=True),
            ],
        }
    )
    last = written[-1]
    assert last.role == "agent" and last.outcome == "resolved" and last.remedy == "refund"


def test_malformed_output_is_retried_then_ends_the_conversation_as_an_error():
    broken = ['{"reply": "half', "not json", '{"reply": "x", "decision": "maybe"}']
    written, responders = play({"customer": broken, "agent": []})
    last = written[-1]
    assert last.final and last.end_reason == "error" and last.role == "customer"
    assert len(responders["customer"].llm.schemas) == 3  # one try and two retries


def test_malformed_output_then_a_good_retry_goes_on():
    model = JsonModel(["{oops", customer_says("My laptop will not charge.", "continue")])
    reply = generate_turn(
        model,
        SCENARIO,
        SCENARIO.draw_persona(random.Random(1)),
        "customer",
        [{"role": "agent", "text": "Hello, how can I help?"}],
        structured=True,
    )
    assert reply.text == "My laptop will not charge." and reply.attempts == 2
    assert reply.decision is not None and not reply.decision.ends_chat


def test_a_reply_cut_off_by_the_token_limit_keeps_its_text_and_its_decision():
    cut = '{"decision": "give_up", "reply": "I am done with this. Good'
    text, decision = parse_decision("customer", cut, REMEDIES, truncated=True)
    assert text == "I am done with this. Good" and decision.outcome == "gave_up"
    text, _ = parse_decision("customer", cut[:-5] + "\\", REMEDIES, truncated=True)
    assert text == "I am done with this."
    # the agent's label comes after its reply: a cut reply offers nothing
    cut = '{"reply": "I can offer a repair. It takes'
    text, decision = parse_decision("agent", cut, REMEDIES, truncated=True)
    assert text == "I can offer a repair. It takes" and decision.remedy is None
    text, decision = parse_decision("agent", '{"reply": "Done.", ', REMEDIES, truncated=True)
    assert text == "Done." and not decision.ends_chat
    with pytest.raises(MalformedDecisionError):
        parse_decision("agent", cut, REMEDIES)
    with pytest.raises(MalformedDecisionError, match="unknown remedy"):
        parse_decision("agent", agent_says("x", "a pony"), REMEDIES)


def test_each_attempts_seed_derives_from_the_turn_and_attempt():
    assert attempt_seed("m1", 0) == attempt_seed("m1", 0)
    assert len({attempt_seed("m1", 0), attempt_seed("m1", 1), attempt_seed("m2", 0)}) == 3
    assert attempt_seed("", 0) is None
    written, responders = play(
        {
            "customer": [customer_says("It broke.", "continue"), customer_says("Bye", "accept")],
            "agent": [agent_says("Sorry to hear that.")],
        }
    )
    again, responders_again = play(
        {
            "customer": [customer_says("It broke.", "continue"), customer_says("Bye", "accept")],
            "agent": [agent_says("Sorry to hear that.")],
        }
    )
    seeds = responders["customer"].llm.seeds
    assert seeds == responders_again["customer"].llm.seeds and None not in seeds
    assert len(set(seeds)) == len(seeds)


def test_a_customer_out_of_patience_is_told_to_give_up():
    persona = SCENARIO.draw_persona(random.Random(3))
    history = [
        {"role": "agent" if i % 2 == 0 else "customer", "text": f"line {i}"}
        for i in range(2 * persona.card.patience + 1)
    ]
    model = JsonModel([customer_says("I give up.", "give_up")])
    generate_turn(model, SCENARIO, persona, "customer", history, structured=True)
    assert "give up" in str(model.prompts[0][-1].content)
    offered = [*history[:-1], {**history[-1], "remedy": "refund"}]
    model = JsonModel([customer_says("OK.", "continue")])
    generate_turn(model, SCENARIO, persona, "customer", offered, structured=True)
    assert "give up" not in str(model.prompts[0][-1].content)


def test_the_agent_asks_before_it_offers_a_remedy():
    persona = SCENARIO.draw_persona(random.Random(6))
    first = [
        {"role": "agent", "text": "Hello, how can I help?"},
        {"role": "customer", "text": "My laptop is broken."},
    ]
    model = JsonModel([agent_says("What is your order number?")])
    generate_turn(model, SCENARIO, persona, "agent", first, structured=True)
    assert model.schemas[0]["properties"]["remedy"]["enum"] == ["none"]
    assert model.schemas[0]["properties"]["ends_chat"]["enum"] == [False]
    later = [
        *first,
        {"role": "agent", "text": "What is your order number?"},
        {"role": "customer", "text": "NW-123456."},
    ]
    model = JsonModel([agent_says("I can repair it.", "repair")])
    generate_turn(model, SCENARIO, persona, "agent", later, structured=True)
    assert model.schemas[0]["properties"]["remedy"]["enum"] == ["none", *REMEDIES]
