"""One bot turn: prompt, bounded memory, generation, and a retry when the model repeats itself.

:func:`generate_turn` is what the Kafka bot engine calls for every reply. :class:`LLMResponder`
wraps it for the engine's responder interface.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

from langchain_core.messages import BaseMessage

from supportsim.bots.llm import ChatLLM, ChatModel, LLMConfig, Reply
from supportsim.bots.loops import (
    DUPLICATE_THRESHOLD,
    copies_words_of,
    is_closing_line,
    is_goodbye,
    is_near_duplicate,
    sounds_like_agent,
    without_copied_sentences,
    without_cue_sentences,
)
from supportsim.bots.memory import bounded_messages
from supportsim.bots.models import Progress
from supportsim.bots.prompts import (
    OFFERED_HELP_WARNING,
    REPEAT_WARNING,
    TURN_REMINDERS,
    WRAP_UP_CUE,
    Persona,
    Scenario,
)
from supportsim.messages import Role

logger = logging.getLogger(__name__)

# how many earlier lines a reply is compared with when looking for a loop
RECENT_LINES = 8
RETRY_TEMPERATURE_STEP = 0.3
MAX_TEMPERATURE = 1.5
RETRY_REPEAT_PENALTY = 1.25
REPEATS = "repeats an earlier line"
OFFERS_HELP = "speaks like the agent instead of asking for help"
COPIES_CUE = "copies its stage direction"
EARLY_GOODBYE = "says goodbye before saying what is wrong"
# which attempt is kept when every one has a problem: the lowest rank (a customer in the agent's
# voice still moves the chat on; a copied stage direction is nonsense; a repeat is a loop)
PROBLEM_RANK: dict[str | None, int] = {
    None: 0,
    OFFERS_HELP: 1,
    EARLY_GOODBYE: 1,
    COPIES_CUE: 2,
    REPEATS: 3,
}
SPEAKER_LABELS: dict[Role, tuple[str, ...]] = {
    "customer": ("Customer", "CUSTOMER"),
    "agent": ("Agent", "AGENT"),
}


class EmptyReplyError(RuntimeError):
    """The model produced nothing usable, also on its retry."""


class ConversationView(Protocol):
    """What a responder reads from a conversation's state."""

    conversation_id: str
    customer: dict
    agent: dict
    history: list[dict]


def other_side(role: Role) -> Role:
    """The role a bot playing `role` talks to."""
    return "agent" if role == "customer" else "customer"


def stop_sequences(role: Role, persona: Persona) -> list[str]:
    """Where generation stops: the point the model starts writing the other side's line."""
    other = other_side(role)
    name = persona.name_of(other)
    first_name = name.split()[0]
    stops = [f"{label}:" for label in SPEAKER_LABELS[other]]
    stops += [f"{name}:", f"\n{first_name}:", "\nUser:", "\nAssistant:"]
    # the reminders in the prompt are stage directions: a model that starts copying one is done
    cues = (*TURN_REMINDERS.values(), REPEAT_WARNING, OFFERED_HELP_WARNING, WRAP_UP_CUE)
    stops += ["\n(", *(_opening_words(text) for text in cues)]
    if other == "agent":
        stops.append("Support agent:")
    return list(dict.fromkeys(stops))


def _opening_words(template: str) -> str:
    return " ".join(template.split("{", 1)[0].split()[:2])


def own_labels(role: Role, persona: Persona) -> list[str]:
    """Names the speaker might write in front of its own line (stripped from replies)."""
    name = persona.name_of(role)
    return list(dict.fromkeys([name, name.split()[0], *SPEAKER_LABELS[role]]))


def _turn_flags(role: Role, history: Sequence[Mapping[str, Any]]) -> tuple[bool, bool]:
    """(wrap_up, first): the other side just closed; the customer has not spoken yet."""
    wrap_up = (
        bool(history)
        and history[-1].get("role") != role
        and is_closing_line(str(history[-1].get("text", "")))
    )
    first = role == "customer" and not any(line.get("role") == role for line in history)
    return wrap_up, first


def _bounded_prompt(
    llm: ChatModel,
    scenario: Scenario,
    persona: Persona,
    role: Role,
    lines: Sequence[Mapping[str, Any]],
    cue: str,
) -> list[BaseMessage]:
    return bounded_messages(
        scenario.system_prompt(role, persona),
        lines,
        role,
        token_counter=llm.count_tokens,
        max_tokens=llm.max_prompt_tokens,
        opening_cue=scenario.opening_cue(role, persona),
        reminder=cue,
    )


def turn_prompt(
    llm: ChatModel,
    scenario: Scenario,
    persona: Persona,
    role: Role,
    history: Sequence[Mapping[str, Any]],
) -> list[BaseMessage]:
    """The messages of a turn's first attempt, as :func:`generate_turn` sends them."""
    wrap_up, first = _turn_flags(role, history)
    cue = scenario.turn_reminder(role, persona, wrap_up=wrap_up, first=first)
    return _bounded_prompt(llm, scenario, persona, role, history, cue)


def generate_turn(
    llm: ChatModel,
    scenario: Scenario,
    persona: Persona,
    role: Role,
    history: Sequence[Mapping[str, Any]],
    *,
    duplicate_threshold: float = DUPLICATE_THRESHOLD,
    conversation: str = "",
) -> Reply:
    """The next line of `role` in a conversation with `persona`, given its `history` so far.

    `history` is the plain conversation history ({"role", "text"} dicts, oldest first).
    Sentences of a reply that copy earlier lines are dropped when the model added something of
    its own (a small model often echoes the other side first). When an attempt is still empty,
    repeats a recent line, copies words of its stage direction, or (for the customer) speaks
    like the agent or says goodbye in its first message, generation is retried
    (``LLM_RETRIES`` times at most, 2 by default) with hotter sampling each time, a new seed
    and a warning in the prompt. The last attempt with no such problem is kept, else the last
    with the mildest problem (:data:`PROBLEM_RANK`); when every written attempt repeats, the
    reply comes back with ``loop=True`` (the caller ends the conversation). The customer is
    told to open with its problem with the product in its first message, and after an agent's
    closing line (a farewell or "anything else?") that it may thank the agent and say goodbye.
    Token counts and latency cover every attempt. `conversation` (its id) lets the model
    continue that conversation's saved prompt state. Raises :class:`EmptyReplyError` when every
    attempt is empty.
    """
    wrap_up, first = _turn_flags(role, history)

    def reminder(repeated: bool = False, offered_help: bool = False) -> str:
        return scenario.turn_reminder(
            role,
            persona,
            repeated=repeated,
            offered_help=offered_help,
            wrap_up=wrap_up,
            first=first,
        )

    def prompt(cue: str, lines: Sequence[Mapping[str, Any]] = history) -> list[BaseMessage]:
        return _bounded_prompt(llm, scenario, persona, role, lines, cue)

    stop = stop_sequences(role, persona)
    labels = own_labels(role, persona)
    recent = [str(line["text"]) for line in history[-RECENT_LINES:]]
    config = llm.config

    def problem(reply: Reply, cue: str) -> str | None:
        """Why an attempt is generated again, or None when it is fine."""
        if not reply.text:
            return "was empty"
        if is_near_duplicate(reply.text, recent, duplicate_threshold):
            return REPEATS
        if role == "customer" and sounds_like_agent(reply.text):
            return OFFERS_HELP
        if first and is_goodbye(reply.text):
            return EARLY_GOODBYE
        if copies_words_of(reply.text, cue):
            return COPIES_CUE
        return None

    def attempt(messages: list[BaseMessage], cue: str, **sampling: Any) -> Reply:
        reply = llm.reply(messages, stop=stop, labels=labels, conversation=conversation, **sampling)
        # keep what the model added to an echo of earlier lines or of its stage direction; a
        # reply that is nothing but an echo stays whole, for `problem` to see
        text = without_copied_sentences(reply.text, recent) or reply.text
        text = without_cue_sentences(text, cue) or text
        if text != reply.text:
            logger.debug("%s reply: dropped sentences copied from earlier lines or its cue", role)
            return replace(reply, text=text)
        return reply

    cue = reminder()
    tries = [attempt(prompt(cue), cue)]
    problems = [problem(tries[-1], cue)]
    retry_cue, retry_prompt = cue, None
    while problems[-1] is not None and len(tries) <= config.retries:
        logger.info(
            "%s reply %s; retrying with hotter sampling (%d of %d)",
            role,
            problems[-1],
            len(tries),
            config.retries,
        )
        if retry_prompt is None:  # built once: it tokenises the whole history
            retry_cue = reminder(repeated=REPEATS in problems, offered_help=OFFERS_HELP in problems)
            retry_prompt = prompt(retry_cue)
        messages = retry_prompt
        if len(tries) == config.retries and REPEATS in problems and len(history) > 1:
            # the last resort against a loop: only the message being answered is left to copy
            messages = prompt(retry_cue, history[-1:])
        tries.append(
            attempt(
                messages,
                retry_cue,
                temperature=min(
                    config.temperature + RETRY_TEMPERATURE_STEP * len(tries), MAX_TEMPERATURE
                ),
                seed=(config.seed + 7919 * len(tries)) % 2**31 if config.seed >= 0 else None,
                repeat_penalty=max(config.repeat_penalty, RETRY_REPEAT_PENALTY),
            )
        )
        problems.append(problem(tries[-1], retry_cue))
    written = [(t, p) for t, p in zip(tries, problems, strict=True) if t.text]
    if not written:
        raise EmptyReplyError(f"the model wrote nothing for the {role}, {len(tries)} times")
    # the last attempt with the mildest problem (none at best); only repeats left is a loop
    mildest = min(PROBLEM_RANK[p] for _, p in written)
    chosen = [t for t, p in written if PROBLEM_RANK[p] == mildest][-1]
    loop = mildest == PROBLEM_RANK[REPEATS]
    if loop and len(tries) > 1:
        logger.warning(
            "%s reply still repeats an earlier line after %d retries", role, len(tries) - 1
        )
    if len(tries) == 1:
        return chosen
    return Reply(
        text=chosen.text,
        prompt_tokens=sum(t.prompt_tokens for t in tries),
        completion_tokens=sum(t.completion_tokens for t in tries),
        latency_ms=sum(t.latency_ms for t in tries),
        finish_reason=chosen.finish_reason,
        loop=loop,
        attempts=len(tries),
        raw_text=chosen.raw_text,
        evaluated_prompt_tokens=_total(t.evaluated_prompt_tokens for t in tries),
    )


def _total(counts: Iterable[int | None]) -> int | None:
    """The sum of `counts`, or None when any is unknown."""
    values = list(counts)
    return None if None in values else sum(v for v in values if v is not None)


class LLMResponder:
    """Answers for one side of any conversation with a loaded model and a scenario.

    Matches the bot engine's responder interface: ``model_name`` and ``respond(role, state)``,
    where the state carries the `customer` and `agent` persona dicts and the `history`.
    """

    def __init__(self, llm: ChatModel, scenario: Scenario) -> None:
        self.llm = llm
        self.scenario = scenario
        self.model_name = llm.model_name

    @classmethod
    def from_env(cls, scenario: Scenario, *, progress: Progress | None = None) -> LLMResponder:
        """The model of the ``LLM_*`` variables, loaded here or on a server (once per process)."""
        config = LLMConfig()
        if config.backend == "openai":
            from supportsim.bots.server import ServerChatLLM

            return cls(ServerChatLLM.connect(config), scenario)
        return cls(ChatLLM.load(config, progress=progress), scenario)

    def respond(self, role: Role, conversation: ConversationView) -> Reply:
        """The reply of `role` to the conversation so far."""
        persona = Persona.from_contract(conversation.customer, conversation.agent)
        return generate_turn(
            self.llm,
            self.scenario,
            persona,
            role,
            conversation.history,
            # one saved state per side: each side's prompt is its own view of the conversation
            conversation=f"{conversation.conversation_id}/{role}",
        )
