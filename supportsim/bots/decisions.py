"""Structured turns: the reply and its decision as one JSON object the model must write.

The schema is handed to the model as a constraint (a llama.cpp grammar in process, the
``response_format`` of an OpenAI-compatible server), so the output always parses unless it was
cut off; whether a turn ends the chat, how, and which remedy the agent offers are read from it,
never guessed from the words of the reply.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from supportsim.bots.cards import NO_REMEDY
from supportsim.bots.conversation import Decision
from supportsim.contract.messages import Role

CustomerChoice = Literal["continue", "accept", "give_up"]
CUSTOMER_CHOICES: tuple[CustomerChoice, ...] = ("continue", "accept", "give_up")
# a reply's longest text in the schema: about three sentences, so the model must be brief
MAX_REPLY_CHARS = 360


class MalformedDecisionError(ValueError):
    """The model's structured output does not parse or break the schema."""


def decision_schema(
    role: Role,
    remedies: Sequence[str],
    *,
    can_accept: bool = True,
    can_give_up: bool = True,
    can_close: bool = True,
    can_continue: bool = True,
) -> dict[str, Any]:
    """The JSON schema of `role`'s turn.

    The customer decides first, then writes the reply that carries the decision out; the agent
    writes its reply first, then names the remedy that reply offers (a label of its own words).
    A customer can accept only once a remedy was offered (`can_accept`) and give up only when
    `can_give_up`, and goes on only while `can_continue`; the agent can close the chat only
    when `can_close`: the choices a side does not have are not in the schema.
    """
    reply = {"type": "string", "minLength": 1, "maxLength": MAX_REPLY_CHARS}
    if role == "customer":
        choices = [
            c
            for c in CUSTOMER_CHOICES
            if (c != "accept" or can_accept)
            and (c != "give_up" or can_give_up or not can_continue)
            and (c != "continue" or can_continue)
        ]
        properties: dict[str, Any] = {"decision": {"enum": choices}, "reply": reply}
    else:
        properties = {
            "reply": reply,
            "remedy": {"enum": [NO_REMEDY, *remedies]},
            "ends_chat": {"enum": [False, True] if can_close else [False]},
        }
    return {"type": "object", "properties": properties, "required": list(properties)}


def parse_decision(
    role: Role, raw: str, remedies: Sequence[str], *, truncated: bool = False
) -> tuple[str, Decision]:
    """The reply text and decision in `raw`, the model's structured output.

    A reply cut off by the token limit keeps its text and the decision written before it; what
    it did not reach decides nothing (the customer goes on, the agent offers nothing). Raises
    :class:`MalformedDecisionError` for anything else that is not the schema.
    """
    data = _load(raw, truncated)
    if truncated and isinstance(data, dict):
        data = {"decision": "continue", "remedy": NO_REMEDY, "ends_chat": False, **data}
    if not isinstance(data, dict) or not isinstance(data.get("reply"), str):
        raise MalformedDecisionError(f"no reply text in {raw[:80]!r}")
    text = data["reply"]
    if role == "customer":
        choice = data.get("decision")
        if choice not in CUSTOMER_CHOICES:
            raise MalformedDecisionError(f"unknown customer decision {choice!r}")
        if choice == "continue":
            return text, Decision()
        return text, Decision(
            ends_chat=True, outcome="resolved" if choice == "accept" else "gave_up"
        )
    remedy = data.get("remedy")
    if remedy != NO_REMEDY and remedy not in remedies:
        raise MalformedDecisionError(f"unknown remedy {remedy!r}")
    ends = data.get("ends_chat")
    if not isinstance(ends, bool):
        raise MalformedDecisionError(f"ends_chat must be true or false, not {ends!r}")
    return text, Decision(ends_chat=ends, remedy=None if remedy == NO_REMEDY else remedy)


def _load(raw: str, truncated: bool) -> Any:
    """`raw` as JSON; a cut-off output (the reply is its last field) closed where it stopped."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        if truncated:
            # the cut may fall inside an escape ("\\"), so also try without its last character;
            # a cut after the reply closes only the object
            for closed in (raw + '"}', raw[:-1] + '"}', raw.rstrip().rstrip(",") + "}"):
                try:
                    return json.loads(closed)
                except json.JSONDecodeError:
                    continue
        raise MalformedDecisionError(f"not JSON: {raw[:80]!r}") from None
