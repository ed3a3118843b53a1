"""One bot turn: prompt, bounded memory, generation, and a retry when the model repeats itself.

:func:`generate_turn` is what the Kafka bot engine calls for every reply. :class:`LLMResponder`
wraps it for the engine's responder interface.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from langchain_core.messages import BaseMessage

from supportsim.bots.cards import CARD_LABELS
from supportsim.bots.decisions import (
    MAX_REPLY_CHARS,
    MalformedDecisionError,
    decision_schema,
    parse_decision,
)
from supportsim.bots.llm import ChatLLM, ChatModel, Completion, LLMConfig, clean_reply
from supportsim.bots.loops import (
    DUPLICATE_THRESHOLD,
    Phrases,
    copies_words_of,
    is_near_duplicate,
    without_copied_sentences,
    without_cue_sentences,
    without_sentences,
)
from supportsim.bots.memory import bounded_messages
from supportsim.bots.models import AssemblyProgress
from supportsim.bots.prompts import Directions, Persona, Scenario
from supportsim.contract.messages import Role
from supportsim.contract.protocol import turn_message_id

logger = logging.getLogger(__name__)

# how many earlier lines a reply is compared with when looking for a loop
RECENT_LINES = 8
RETRY_TEMPERATURE_STEP = 0.3
MAX_TEMPERATURE = 1.5
RETRY_REPEAT_PENALTY = 1.25
# a customer says this many lines before it may give up, or the agent offer a remedy or close
MIN_LINES_BEFORE_GIVING_UP = 2


class EmptyReplyError(RuntimeError):
    """The model produced nothing usable, also on its retry."""


class ConversationView(Protocol):
    """What a responder reads from a conversation's state."""

    conversation_id: str
    customer: dict
    agent: dict
    history: list[dict]
    last_turn: int
    card: dict | None
    policy: dict | None


def other_side(role: Role) -> Role:
    """The role a bot playing `role` talks to."""
    return "agent" if role == "customer" else "customer"


def stop_sequences(role: Role, persona: Persona, directions: Directions) -> list[str]:
    """Where generation stops: the point the model starts writing the other side's line."""
    other = other_side(role)
    name = persona.name_of(other)
    first_name = name.split()[0]
    stops = [f"{label}:" for label in directions.speaker_labels[other]]
    stops += [f"{name}:", f"\n{first_name}:", "\nUser:", "\nAssistant:"]
    # the reminders in the prompt are stage directions: a model that starts copying one is done
    stops += ["\n(", *(_opening_words(text) for text in directions.all_cues())]
    return list(dict.fromkeys(stops))


def _opening_words(template: str) -> str:
    return " ".join(template.split("{", 1)[0].split()[:2])


def own_labels(role: Role, persona: Persona, directions: Directions) -> list[str]:
    """Names the speaker might write in front of its own line (stripped from replies)."""
    name = persona.name_of(role)
    return list(dict.fromkeys([name, name.split()[0], *directions.speaker_labels[role]]))


@dataclass(frozen=True)
class TurnView:
    """What the reply checks see of a turn besides the attempt itself."""

    role: Role
    recent: list[str]
    cue: str
    first: bool
    phrases: Phrases
    duplicate_threshold: float
    instructions: str = ""  # the bot's own standing instructions, which it must never say


@dataclass(frozen=True)
class Check:
    """A named reply check: an attempt that `fails` it is generated again.

    `rank` orders the problems when every attempt has one: the attempt with the lowest rank is
    kept (a customer in the agent's voice still moves the chat on; a copied stage direction is
    nonsense; a repeat is a loop). The retry's reminder adds the scenario's hint of the same
    name (``hints`` in directions.yaml), where it has one.
    """

    name: str
    roles: tuple[Role, ...]
    rank: int
    fails: Callable[[Completion, TurnView], bool]


REPEATS = "repeats"
COPIES_CUE = "copies_cue"
CHECKS: tuple[Check, ...] = (
    Check(
        REPEATS,
        ("customer", "agent"),
        3,
        lambda r, v: is_near_duplicate(r.text, v.recent, v.duplicate_threshold),
    ),
    Check("agent_voice", ("customer",), 1, lambda r, v: v.phrases.sounds_like_agent(r.text)),
    Check(
        "early_goodbye",
        ("customer",),
        1,
        lambda r, v: (
            v.first and (r.decision.ends_chat if r.decision else v.phrases.is_goodbye(r.text))
        ),
    ),
    Check(COPIES_CUE, ("customer", "agent"), 2, lambda r, v: copies_words_of(r.text, v.cue)),
    Check(
        "copies_instructions",
        ("customer",),
        2,
        # the model's own words: a recital is cut from the text, but the attempt is still retried
        lambda r, v: recites_instructions(r.raw_text or r.text, v.instructions),
    ),
)


# a bot that can only repeat itself or parrot its stage direction is stuck: the chat ends (loop),
# and a parroted "thank Sam and say goodbye" never counts as a goodbye
STUCK = (REPEATS, COPIES_CUE)
# an empty attempt: generated again, and never the one kept
EMPTY = Check("empty", ("customer", "agent"), 99, lambda r, v: not r.text)


def failed_check(reply: Completion, view: TurnView) -> Check | None:
    """The first check of :data:`CHECKS` for its role that `reply` fails, if any."""
    return next((c for c in CHECKS if view.role in c.roles and c.fails(reply, view)), None)


def _turn_flags(
    role: Role, history: Sequence[Mapping[str, Any]], persona: Persona, phrases: Phrases
) -> dict[str, bool]:
    """wrap_up: the other side just closed; first: the customer has not spoken yet;
    impatient: the customer's patience (from its card) is spent with no remedy offered."""
    wrap_up = (
        bool(history)
        and history[-1].get("role") != role
        and phrases.is_closing_line(str(history[-1].get("text", "")))
    )
    spoken = sum(1 for line in history if line.get("role") == role)
    offered = any(line.get("remedy") for line in history)
    return {
        "wrap_up": wrap_up,
        "first": role == "customer" and spoken == 0,
        "impatient": patience_spent(role, history, persona) and not offered,
    }


def own_instructions(role: Role, system_prompt: str) -> str:
    """What the customer's `system_prompt` tells it to do, none of which it should ever say.

    The system prompt's shared rules (all but its last paragraph, the persona; the card's labels
    are checked apart, see :func:`recites_instructions`): a small model now and then writes them
    out as a line of the chat. The card's facts are left out, since the customer repeats those
    on purpose. The agent's rules name its remedies, which it does say: "" for the agent.
    """
    if role != "customer":
        return ""
    return system_prompt.rsplit("\n\n", 1)[0]


def recites_instructions(text: str, instructions: str) -> bool:
    """True when `text` copies a run of its bot's `instructions` or a label of the card."""
    if not instructions:
        return False
    return copies_words_of(text, instructions) or copies_words_of(text, CARD_LABELS, run=3)


def patience_spent(role: Role, history: Sequence[Mapping[str, Any]], persona: Persona) -> bool:
    """True when the customer has said as many lines as its card's patience allows."""
    if role != "customer" or persona.card is None:
        return False
    return sum(1 for line in history if line.get("role") == role) >= persona.card.patience


def _bounded_prompt(
    llm: ChatModel,
    scenario: Scenario,
    persona: Persona,
    role: Role,
    lines: Sequence[Mapping[str, Any]],
    cue: str,
    system_prompt: str,
) -> list[BaseMessage]:
    return bounded_messages(
        system_prompt,
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
    *,
    structured: bool = False,
) -> list[BaseMessage]:
    """The messages of a turn's first attempt, as :func:`generate_turn` sends them."""
    flags = _turn_flags(role, history, persona, scenario.phrases)
    cue = scenario.turn_reminder(role, persona, structured=structured, **flags)
    system = scenario.system_prompt(role, persona)
    return _bounded_prompt(llm, scenario, persona, role, history, cue, system)


def attempt_seed(seed_key: str, attempt: int, base_seed: int = -1) -> int | None:
    """The sampling seed of one attempt at a turn, derived from the turn's message id.

    A turn redone after a crash draws the same seeds, so it writes the same text. None (a
    fresh seed) when there is no key.
    """
    if not seed_key:
        return None
    digest = hashlib.sha256(f"{seed_key}/{attempt}/{base_seed}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 2**31


def generate_turn(
    llm: ChatModel,
    scenario: Scenario,
    persona: Persona,
    role: Role,
    history: Sequence[Mapping[str, Any]],
    *,
    duplicate_threshold: float = DUPLICATE_THRESHOLD,
    conversation: str = "",
    structured: bool = False,
    seed_key: str = "",
) -> Completion:
    """The next line of `role` in a conversation with `persona`, given its `history` so far.

    `history` is the plain conversation history ({"role", "text"} dicts, oldest first).
    Sentences of a reply that copy earlier lines, and a customer's sentences in the helper's
    voice, are dropped when the model wrote something else of its own (a small model often
    echoes the other side first, or slips into "How can I help?"). When an attempt is still empty,
    repeats a recent line, copies words of its stage direction, or (for the customer) speaks
    like the agent or says goodbye in its first message, generation is retried
    (``LLM_RETRIES`` times at most, 2 by default) with hotter sampling each time, a new seed
    and a warning in the prompt. The last attempt with no such problem is kept, else the last
    with the mildest problem (:attr:`Check.rank`); when every written attempt repeats or
    parrots its stage direction (:data:`STUCK`), the reply comes back with ``loop=True`` (the
    caller ends the conversation). The customer is
    told to open with its problem with the product in its first message, and after an agent's
    closing line (a farewell or "anything else?") that it may thank the agent and say goodbye.
    Token counts and latency cover every attempt. `conversation` (its id) lets the model
    continue that conversation's saved prompt state. Raises :class:`EmptyReplyError` when every
    attempt is empty.

    `structured` has the model write its reply and decision as constrained JSON
    (:mod:`supportsim.bots.decisions`); the reply carries the decision, and output that does
    not parse counts as empty (retried). `seed_key` (the turn's message id) makes each
    attempt's seed a function of the turn and attempt number.
    """
    flags = _turn_flags(role, history, persona, scenario.phrases)
    schema = None
    if structured:
        offered = [line["remedy"] for line in history if line.get("remedy")]
        customer_lines = sum(1 for line in history if line.get("role") == "customer")
        wanted = persona.card.accepts if persona.card and persona.card.accepts else offered
        spent = patience_spent(role, history, persona)
        schema = decision_schema(
            role,
            # the agent asks before it offers: no remedy in its answer to the first complaint
            scenario.remedies if customer_lines >= MIN_LINES_BEFORE_GIVING_UP else (),
            # what it wants is accepted at once; anything else only once its patience is spent
            can_accept=bool(offered) and (offered[-1] in wanted or spent),
            can_give_up=flags["impatient"] or customer_lines >= MIN_LINES_BEFORE_GIVING_UP,
            # the agent closes only a chat in which it offered something and heard the answer
            can_close=bool(offered) and customer_lines >= MIN_LINES_BEFORE_GIVING_UP,
            # a customer whose patience is spent takes what is offered or leaves
            can_continue=not spent,
        )

    def reminder(hints: Sequence[str] = ()) -> str:
        return scenario.turn_reminder(role, persona, hints=hints, structured=structured, **flags)

    system = scenario.system_prompt(role, persona)  # rendered once per turn, not per attempt

    def prompt(cue: str, lines: Sequence[Mapping[str, Any]] = history) -> list[BaseMessage]:
        return _bounded_prompt(llm, scenario, persona, role, lines, cue, system)

    stop = stop_sequences(role, persona, scenario.directions)
    instructions = own_instructions(role, system)
    labels = own_labels(role, persona, scenario.directions)
    recent = [str(line["text"]) for line in history[-RECENT_LINES:]]
    config = llm.config

    def problem(reply: Completion, cue: str) -> Check | None:
        """The check an attempt fails (it is generated again), or None when it is fine."""
        if not reply.text:
            return EMPTY
        view = TurnView(
            role, recent, cue, flags["first"], scenario.phrases, duplicate_threshold, instructions
        )
        return failed_check(reply, view)

    def attempt(messages: list[BaseMessage], cue: str, **sampling: Any) -> Completion:
        seed = attempt_seed(seed_key, len(tries), config.seed)
        if seed is not None:
            sampling["seed"] = seed
        reply = llm.reply(
            messages,
            stop=() if schema else stop,
            labels=labels,
            conversation=conversation,
            schema=schema,
            **sampling,
        )
        if schema is not None:
            reply = _structured(reply, role, scenario.remedies, stop, labels, config)
        # keep what the model added to an echo of earlier lines or of its stage direction; a
        # reply that is nothing but an echo stays whole, for `problem` to see
        text = without_copied_sentences(reply.text, recent) or reply.text
        text = without_cue_sentences(text, cue) or text
        if instructions:
            text = (
                without_sentences(text, lambda line: recites_instructions(line, instructions))
                or text
            )
        if role == "customer":
            # a customer line with a helper's phrase in it keeps the customer's own sentences
            text = without_sentences(text, scenario.phrases.sounds_like_agent) or text
        if text != reply.text:
            logger.debug("%s reply: dropped sentences copied from earlier lines or its cue", role)
            return replace(reply, text=text, raw_text=reply.raw_text or reply.text)
        return reply

    cue = reminder()
    tries: list[Completion] = []
    tries.append(attempt(prompt(cue), cue))
    problems = [problem(tries[-1], cue)]
    retry_cue, retry_prompt = cue, None
    while problems[-1] is not None and len(tries) <= config.retries:
        logger.info(
            "%s reply failed check %s; retrying with hotter sampling (%d of %d)",
            role,
            problems[-1].name,
            len(tries),
            config.retries,
        )
        names = [p.name for p in problems if p is not None]
        if retry_prompt is None:  # built once: it tokenises the whole history
            retry_cue = reminder(hints=list(dict.fromkeys(names)))
            retry_prompt = prompt(retry_cue)
        messages = retry_prompt
        if len(tries) == config.retries and REPEATS in names and len(history) > 1:
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
    # the last attempt with the mildest problem (none at best)
    chosen, trouble = min(reversed(written), key=lambda w: 0 if w[1] is None else w[1].rank)
    loop = trouble is not None and trouble.name in STUCK
    if loop and len(tries) > 1:
        logger.warning(
            "%s reply still fails %s after %d retries", role, trouble.name, len(tries) - 1
        )
    if len(tries) == 1:
        return replace(chosen, loop=loop)
    return Completion(
        text=chosen.text,
        prompt_tokens=sum(t.prompt_tokens for t in tries),
        completion_tokens=sum(t.completion_tokens for t in tries),
        latency_ms=sum(t.latency_ms for t in tries),
        finish_reason=chosen.finish_reason,
        loop=loop,
        attempts=len(tries),
        raw_text=chosen.raw_text,
        evaluated_prompt_tokens=_total(t.evaluated_prompt_tokens for t in tries),
        decision=chosen.decision,
    )


def _structured(
    reply: Completion,
    role: Role,
    remedies: Sequence[str],
    stop: Sequence[str],
    labels: Sequence[str],
    config: LLMConfig,
) -> Completion:
    """`reply`, whose text is the model's JSON, as its cleaned reply text and decision.

    The stop strings, not given to the model (they could cut the JSON), cut the reply text.
    Output that does not parse becomes an empty reply, which the caller retries.
    """
    try:
        text, decision = parse_decision(
            role, reply.text, remedies, truncated=reply.finish_reason == "length"
        )
    except MalformedDecisionError as exc:
        logger.info("%s reply is not the structured output asked for: %s", role, exc)
        return replace(reply, text="", raw_text=reply.text, decision=None)
    for marker in stop:
        text = text.split(marker, 1)[0]
    cut = reply.finish_reason == "length" or len(text) >= MAX_REPLY_CHARS
    text = clean_reply(text, labels, config.max_reply_chars, truncated=cut)
    return replace(reply, text=text, raw_text=reply.text, decision=decision)


def _total(counts: Iterable[int | None]) -> int | None:
    """The sum of `counts`, or None when any is unknown."""
    values = list(counts)
    return None if None in values else sum(v for v in values if v is not None)


class LLMResponder:
    """Answers for one side of any conversation with a loaded model and a scenario.

    Matches the bot engine's responder interface: ``model_name`` and ``respond(role, state)``,
    where the state carries the `customer` and `agent` persona dicts and the `history`.
    """

    def __init__(self, llm: ChatModel, scenario: Scenario, *, structured: bool | None = None):
        self.llm = llm
        self.scenario = scenario
        self.model_name = llm.model_name
        self.structured = llm.config.structured if structured is None else structured

    @classmethod
    def from_env(
        cls, scenario: Scenario, *, progress: AssemblyProgress | None = None
    ) -> LLMResponder:
        """The model of the ``LLM_*`` variables, loaded here or on a server (once per process)."""
        config = LLMConfig()
        if config.backend == "openai":
            from supportsim.bots.server import ServerChatLLM

            return cls(ServerChatLLM.connect(config), scenario)
        return cls(ChatLLM.load(config, progress=progress), scenario)

    def respond(self, role: Role, conversation: ConversationView) -> Completion:
        """The reply of `role` to the conversation so far."""
        persona = Persona.from_contract(
            conversation.customer, conversation.agent, conversation.card, conversation.policy
        )
        return generate_turn(
            self.llm,
            self.scenario,
            persona,
            role,
            conversation.history,
            # one saved state per side: each side's prompt is its own view of the conversation
            conversation=f"{conversation.conversation_id}/{role}",
            structured=self.structured,
            seed_key=turn_message_id(conversation.conversation_id, conversation.last_turn + 1),
        )
