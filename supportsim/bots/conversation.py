"""The conversation protocol, as pure functions of (state, incoming message).

Each bot keeps one plain-data state per conversation (Quix Streams state, keyed by
conversation_id, backed by a changelog topic). Both bots read every message of a conversation;
a bot replies only to the other side. Exactly one reply per turn follows from the turn check: a
message whose turn is not past the last one seen is a duplicate and is ignored, and with
exactly-once processing the reply, the state change and the consumed offset commit together.

A conversation starts with the agent's greeting (turn 0, from a template, so no LLM is needed
to start one). Whichever bot writes a conversation's final message also writes the greeting of
its replacement, so the number of conversations stays at the seeded target.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Protocol

from supportsim.contract.messages import (
    MAX_TEXT_CHARS,
    AgentPersona,
    ChatMessage,
    CustomerPersona,
    DeadLetter,
    Role,
    now_ms,
)
from supportsim.contract.messages import Outcome as ConversationOutcome
from supportsim.contract.protocol import successor_id, turn_message_id, turn_order_problem

logger = logging.getLogger(__name__)

MAX_HISTORY = 200
ERROR_TEXT = "[this conversation ended because the {role} bot failed: {error}]"


@dataclass(frozen=True)
class Decision:
    """What a turn decided, as data: whether it ends the chat, how, and the remedy offered.

    `outcome` is the customer's view when it ends the chat (``resolved`` or ``gave_up``);
    `remedy` is the agent's offer (None: none this turn).
    """

    ends_chat: bool = False
    outcome: ConversationOutcome | None = None
    remedy: str | None = None


@dataclass
class Reply:
    """What a responder produced for one turn."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: int = 0
    loop: bool = False
    evaluated_prompt_tokens: int | None = None
    # the structured decision of the turn; None: the responder gave none (ended by words then)
    decision: Decision | None = None
    # what the model wrote when it differs from `text` (structured output), for its own history
    raw_text: str = ""


class Responder(Protocol):
    """Writes the next line of one side of a conversation (an LLM, or scripted templates)."""

    model_name: str

    def respond(self, role: Role, conversation: ConversationState) -> Reply:
        """The reply of `role` to the conversation so far."""
        ...


class Opening(Protocol):
    """Draws the persona and greeting of a new conversation (a scenario)."""

    def open(self, conversation_id: str, rng: random.Random) -> tuple[Any, ...]:
        """Return (customer persona, agent persona, greeting text[, extra message fields]).

        The extra fields (a dict, optional) are the scenario card and policy of the conversation.
        """
        ...


@dataclass
class ConversationState:
    """Everything a bot remembers about one conversation: plain data, never model objects."""

    conversation_id: str
    customer: dict
    agent: dict
    # {"turn", "role", "text"}, plus "remedy" on an agent line that offered one and "raw" on
    # this bot's own structured lines (what the model wrote, shown back to it)
    history: list[dict] = field(default_factory=list)
    last_turn: int = -1
    ended: bool = False
    end_reason: str | None = None
    card: dict | None = None
    policy: dict | None = None

    def to_state(self) -> dict[str, Any]:
        """The dict stored in Quix state (history dropped once ended)."""
        return {
            "conversation_id": self.conversation_id,
            "customer": self.customer,
            "agent": self.agent,
            "history": [] if self.ended else self.history[-MAX_HISTORY:],
            "last_turn": self.last_turn,
            "ended": self.ended,
            "end_reason": self.end_reason,
            "card": None if self.ended else self.card,
            "policy": None if self.ended else self.policy,
        }

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> ConversationState:
        """Rebuild from what :meth:`to_state` stored (states stored before cards had none)."""
        return cls(**data)

    @property
    def remedy(self) -> str | None:
        """The last remedy the agent offered, if any."""
        offered = [h["remedy"] for h in self.history if h.get("remedy")]
        return offered[-1] if offered else None

    def texts(self, role: Role | None = None) -> list[str]:
        """Texts said so far, optionally by one side only."""
        return [h["text"] for h in self.history if role is None or h["role"] == role]


@dataclass
class BotConfig:
    """How a bot behaves: its role, the turn limit, and what to call the model."""

    role: Role
    max_turns: int = 12
    service: str = "bot"

    @property
    def other(self) -> Role:
        """The side this bot answers."""
        return "agent" if self.role == "customer" else "customer"


@dataclass
class Outcome:
    """What handling one message produced: the new state and the records to write."""

    state: ConversationState | None
    messages: list[ChatMessage] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)


def opening_message(conversation_id: str, opening: Opening) -> ChatMessage:
    """Turn 0 of a new conversation: the agent's greeting, with personas drawn for it alone."""
    rng = random.Random(conversation_id)  # per conversation: never shared between conversations
    customer, agent, greeting, *rest = opening.open(conversation_id, rng)
    extra = rest[0] if rest else {}
    return ChatMessage(
        conversation_id=conversation_id,
        message_id=turn_message_id(conversation_id, 0),
        turn=0,
        role="agent",
        text=greeting,
        timestamp_ms=now_ms(),
        customer=CustomerPersona(**customer),
        agent=AgentPersona(**agent),
        model="template",
        prompt_tokens=0,
        completion_tokens=0,
        latency_ms=0,
        card=extra.get("card"),
        policy=extra.get("policy") or None,
    )


def is_goodbye_turn(role: Role, text: str, answering: str = "", phrases: Any = None) -> bool:
    """Whether the customer's `text`, in answer to the agent's `answering`, ends the conversation.

    A customer's goodbye ends it, and so does a customer's plain thanks in answer to an agent's
    closing line ("Is there anything else I can help with?" - "Thank you, I appreciate it.").
    An agent's closing line alone does not: the customer may still have something to say.
    `phrases` are the scenario's (:class:`~supportsim.bots.loops.Phrases`; default scenario's
    when None).
    """
    from supportsim.bots.loops import default_phrases

    if role != "customer":
        return False
    words = phrases or default_phrases()
    return words.is_goodbye(text) or (words.is_thanks(text) and words.is_closing_line(answering))


def handle(
    state: ConversationState | None,
    message: ChatMessage,
    config: BotConfig,
    responder: Responder,
    opening: Opening,
) -> Outcome:
    """Apply one message of the `chat` topic to a bot's state; reply when it is our turn."""
    dead = _check_order(state, message, config)
    if dead is not None:
        return Outcome(state, dead_letters=[dead])
    if state is not None and message.turn <= state.last_turn:
        # our own replies come back this way too; anything else is a redelivered duplicate
        level = logging.DEBUG if message.role == config.role else logging.INFO
        logger.log(level, "ignoring seen turn %s of %s", message.turn, message.conversation_id)
        return Outcome(state)

    if state is None:
        state = ConversationState(
            message.conversation_id,
            customer=message.customer.model_dump(),
            agent=message.agent.model_dump(),
            card=message.card.model_dump() if message.card else None,
            policy=message.policy,
        )
    line = {"turn": message.turn, "role": message.role, "text": message.text}
    if message.remedy:
        line["remedy"] = message.remedy
    state.history.append(line)
    state.last_turn = message.turn
    if message.final:
        state.ended, state.end_reason = True, message.end_reason
        return Outcome(state)
    if message.role == config.role:
        return Outcome(state)  # our own line, read back: remembered, not answered

    phrases = getattr(opening, "phrases", None)
    # a structured line is shown back to its bot as written (JSON); a free-text line as cleaned
    reply_message, raw = _reply(state, message, config, responder, phrases)
    line = {"turn": reply_message.turn, "role": config.role, "text": reply_message.text}
    if reply_message.remedy and reply_message.role == "agent":
        line["remedy"] = reply_message.remedy
    if raw and raw != reply_message.text:
        line["raw"] = raw
    state.history.append(line)
    state.last_turn = reply_message.turn
    out = [reply_message]
    if reply_message.final:
        state.ended, state.end_reason = True, reply_message.end_reason
        out.append(opening_message(successor_id(state.conversation_id), opening))
        logger.info(
            "conversation %s ended (%s) after %s turns; started %s",
            state.conversation_id,
            state.end_reason,
            reply_message.turn + 1,
            out[-1].conversation_id,
        )
    return Outcome(state, messages=out)


def ending(
    role: Role, reply: Reply, answering: str, earlier_remedy: str | None, phrases: Any = None
) -> tuple[str | None, ConversationOutcome | None]:
    """(end_reason, outcome) of a turn that ends the conversation, else (None, None).

    A structured decision decides; without one (a responder that gives none), a customer's
    goodbye by its words does. A customer that accepts has its problem `resolved`, one that
    leaves fed up `gave_up`; an agent that closes the chat leaves it `resolved` when a remedy
    was offered, else `unresolved`.
    """
    decision = reply.decision
    if decision is None:
        if is_goodbye_turn(role, reply.text, answering, phrases):
            return "goodbye", None
        return None, None
    if not decision.ends_chat:
        return None, None
    if decision.outcome is not None:
        return "goodbye", decision.outcome
    offered = decision.remedy or earlier_remedy
    return "goodbye", "resolved" if offered else "unresolved"


def _reply(
    state: ConversationState,
    message: ChatMessage,
    config: BotConfig,
    responder: Responder,
    phrases: Any = None,
) -> tuple[ChatMessage, str]:
    turn = message.turn + 1
    final, end_reason, outcome, remedy = False, None, None, None
    try:
        reply = responder.respond(config.role, state)
        text = reply.text[:MAX_TEXT_CHARS]
        if reply.decision is not None and config.role == "agent":
            remedy = reply.decision.remedy
        if reply.loop:
            final, end_reason = True, "loop"
        else:
            end_reason, outcome = ending(config.role, reply, message.text, state.remedy, phrases)
            final = end_reason is not None
            if not final and turn >= config.max_turns - 1:
                final, end_reason, outcome = True, "turn_limit", "unresolved"
        if outcome == "resolved" and remedy is None:
            remedy = state.remedy  # the remedy the customer accepted
    except Exception as exc:  # a conversation never dies silently: it ends with a reason
        logger.exception("%s bot failed on %s turn %s", config.role, state.conversation_id, turn)
        reply = Reply(text="")
        text = ERROR_TEXT.format(role=config.role, error=type(exc).__name__)
        final, end_reason = True, "error"
    return ChatMessage(
        conversation_id=state.conversation_id,
        message_id=turn_message_id(state.conversation_id, turn),
        turn=turn,
        role=config.role,
        text=text,
        timestamp_ms=now_ms(),
        customer=CustomerPersona(**state.customer),
        agent=AgentPersona(**state.agent),
        model=responder.model_name,
        prompt_tokens=reply.prompt_tokens,
        completion_tokens=reply.completion_tokens,
        evaluated_prompt_tokens=reply.evaluated_prompt_tokens,
        latency_ms=reply.latency_ms,
        final=final,
        end_reason=end_reason,
        card=state.card,
        policy=state.policy,
        outcome=outcome,
        remedy=remedy,
    ), (reply.raw_text if reply.decision is not None else "")


def _check_order(
    state: ConversationState | None, message: ChatMessage, config: BotConfig
) -> DeadLetter | None:
    problem = turn_order_problem(
        message.turn,
        None if state is None else state.last_turn,
        state is not None and state.ended,
        None if state is None else state.end_reason,
    )
    if problem is None and state is None and message.role != "agent":
        problem = "a conversation must start with the agent's greeting (turn 0, role agent)"
    if (
        problem is None
        and state is not None
        and message.turn == state.last_turn + 1
        and state.history
        and message.role == state.history[-1]["role"]
    ):
        problem = f"turn {message.turn} repeats the {message.role} side; roles must alternate"
    if problem is None:
        return None
    from supportsim.contract.messages import dead_letter

    logger.warning("dead letter for %s: %s", message.conversation_id, problem)
    return dead_letter(
        message.model_dump_json().encode(),
        problem,
        service=config.service,
        source_topic="chat",
        key=message.key,
    )
