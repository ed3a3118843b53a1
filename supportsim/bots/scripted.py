"""Scripted bots: replies drawn from templates instead of an LLM, with a configurable think time.

This is how users load-test their pipeline, and how the plumbing is tested at scale: the same
protocol, topics and state as the LLM bots, at thousands of messages per second.
"""

from __future__ import annotations

import random
import time

from supportsim.bots.conversation import ConversationState, Decision, Reply
from supportsim.contract.messages import Role

CUSTOMER_LINES = [
    "My {product} stopped working after two days and I am {mood} about it.",
    "I already tried restarting the {product}. It still does not work.",
    "What are my options here? I want this {product} fixed or replaced.",
    "That is not good enough. I paid a lot for this {product}.",
    "How long will a replacement take?",
    "Can I get a refund instead?",
    "Fine, I will try that, but I expect a follow-up.",
]
CUSTOMER_GOODBYES = [
    "Thanks, that's all I needed. Goodbye.",
    "OK, I'll wait for the replacement. Bye.",
]
# (line, the remedy it offers or None)
AGENT_LINES = [
    ("I'm sorry to hear about your {product}, {name}. Could you tell me the order number?", None),
    ("Thank you. I can offer a repair, a replacement or a refund for the {product}.", None),
    ("I have arranged a replacement {product}; it ships within two working days.", "replacement"),
    ("I understand your frustration. Let me escalate this to my supervisor.", "escalation"),
    ("Is there anything else I can help you with today?", None),
]


class ScriptedResponder:
    """Answers from templates, deterministic per conversation and turn."""

    model_name = "scripted"

    def __init__(self, think_time_s: float = 0.0, goodbye_after: int = 6):
        self.think_time_s = think_time_s
        self.goodbye_after = goodbye_after

    def respond(self, role: Role, conversation: ConversationState) -> Reply:
        """The next templated line for `role`."""
        start = time.monotonic()
        turn = conversation.last_turn + 1
        rng = random.Random(f"{conversation.conversation_id}/{turn}")
        decision = Decision()
        if role == "customer" and turn >= self.goodbye_after:
            line = rng.choice(CUSTOMER_GOODBYES)
            decision = Decision(ends_chat=True, outcome="resolved")
        elif role == "customer":
            line = rng.choice(CUSTOMER_LINES)
        else:
            line, remedy = rng.choice(AGENT_LINES)
            decision = Decision(remedy=remedy)
        text = line.format(
            product=conversation.customer["product"],
            mood=conversation.customer["mood"],
            name=conversation.customer["name"],
        )
        if self.think_time_s:
            time.sleep(self.think_time_s)
        return Reply(
            text=text,
            prompt_tokens=sum(len(t.split()) for t in conversation.texts()),
            completion_tokens=len(text.split()),
            latency_ms=int((time.monotonic() - start) * 1000),
            decision=decision,
        )
