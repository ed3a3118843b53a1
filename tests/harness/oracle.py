"""The test oracle: what the topics and Redis must hold after a run, computed independently."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field

from pydantic import BaseModel

from supportsim.contract.live_view import Conversation, Fleet, FleetGroup
from supportsim.contract.messages import (
    ChatMessage,
    DeadLetter,
    ScoredMessage,
    parse_chat,
    parse_scored,
)
from supportsim.contract.protocol import successor_id
from supportsim.kafka.reader import Record
from supportsim.local.stack import Stack
from supportsim.settings import ServiceSettings
from tests.harness.readback import RedisState, Snapshot, read_records, snapshot
from tests.harness.runs import (
    CHECKER,
    RunConfig,
    Say,
    supervise_for,
)

SCORE_SCALE = 1_000_000  # the aggregates sum scores in integer millionths (docs/redis-keys.md)


@dataclass
class Verification:
    """The outcome of :func:`verify`: figures, and what is wrong per conversation."""

    conversations: int = 0
    exact: int = 0
    ended: int = 0
    in_progress: int = 0
    messages: int = 0
    records: dict[str, int] = field(default_factory=dict)
    duplicates_raw: dict[str, int] = field(default_factory=dict)
    conflicting_duplicates: int = 0
    invalid_records: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    end_reasons: Counter = field(default_factory=Counter)
    problems: dict[str, list[str]] = field(default_factory=dict)
    global_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not a failure

    @property
    def ratio(self) -> float:
        """Conversations verified exact / conversations started."""
        return self.exact / self.conversations if self.conversations else 0.0

    @property
    def aggregates_exact(self) -> bool:
        """True when the fleet totals and the conversation sets in Redis match the topics."""
        return not self.global_problems

    @property
    def ok(self) -> bool:
        """Every conversation exact, and the fleet totals too."""
        return self.conversations > 0 and self.exact == self.conversations and self.aggregates_exact

    def lines(self, limit: int = 12) -> list[str]:
        """A human summary, with the first `limit` problems."""
        out = [
            f"conversations: {self.conversations} started, {self.exact} verified exact "
            f"({self.ended} ended: {dict(self.end_reasons)}; {self.in_progress} in progress)",
            f"messages checked: {self.messages} (raw records {self.records}; raw duplicates "
            f"{self.duplicates_raw}; conflicting duplicates {self.conflicting_duplicates}; "
            f"invalid records {self.invalid_records})",
            f"dead letters: {self.dead_letters}",
            "aggregates: " + ("exact" if self.aggregates_exact else "MISMATCH"),
        ]
        out += [f"  aggregate problem: {p}" for p in self.global_problems[:limit]]
        out += [f"  note: {n}" for n in self.notes]
        for cid, problems in list(self.problems.items())[:limit]:
            out.append(f"  conversation {cid}: {'; '.join(problems)}")
        if len(self.problems) > limit:
            out.append(f"  ... and {len(self.problems) - limit} more conversations with problems")
        return out


def _parsed(records: list[Record], topic: str, model: str) -> tuple[list, int]:
    parse = parse_chat if model == "chat" else parse_scored
    good, bad = [], 0
    for record in records:
        message = parse(record.value, service=CHECKER, source_topic=topic, key=record.key)
        if isinstance(message, DeadLetter):
            bad += 1
        else:
            good.append(message)
    return good, bad


def _first_copies(
    messages: list[ChatMessage], skip_ids: set[str], skip_conversations: set[str]
) -> tuple[dict[str, list[ChatMessage]], int, int, int]:
    """Group by conversation keeping each message_id's first copy; count raw and conflicts."""
    copies: dict[str, list[ChatMessage]] = {}
    for message in messages:
        if message.message_id in skip_ids or message.conversation_id in skip_conversations:
            continue
        copies.setdefault(message.message_id, []).append(message)
    conversations: dict[str, list[ChatMessage]] = {}
    raw = conflicts = 0
    for same in copies.values():
        raw += len(same)
        signatures = {_signature(m) for m in same}
        conflicts += len(signatures) > 1
        conversations.setdefault(same[0].conversation_id, []).append(same[0])
    for conversation in conversations.values():
        conversation.sort(key=lambda m: m.turn)
    return conversations, raw, len(copies), conflicts


def _signature(message: ChatMessage) -> str:
    data = message.model_dump(mode="json", exclude={"timestamp_ms", "latency_ms", "sentiment"})
    return json.dumps(data, sort_keys=True)


def transcript_problems(conversation: list[ChatMessage]) -> list[str]:
    """What is wrong with one conversation's messages (first copies, in turn order)."""
    problems = []
    turns = [m.turn for m in conversation]
    if turns != list(range(len(turns))):
        problems.append(f"turns not consecutive from 0: {turns}")
    roles = [m.role for m in conversation]
    if roles != ["agent" if t % 2 == 0 else "customer" for t in range(len(roles))]:
        problems.append(f"roles do not alternate from the agent's greeting: {roles}")
    personas = {json.dumps([m.customer.model_dump(), m.agent.model_dump()]) for m in conversation}
    if len(personas) > 1:
        problems.append("persona changed during the conversation")
    finals = [m.turn for m in conversation if m.final]
    if finals and finals != [turns[-1]]:
        problems.append(f"final flag on turns {finals}, last turn {turns[-1]}")
    if conversation and conversation[-1].final and not conversation[-1].end_reason:
        problems.append("final message without end_reason")
    return problems


def _scored_problems(chat: list[ChatMessage], scored: list[ScoredMessage]) -> list[str]:
    chat_ids = [m.message_id for m in chat]
    scored_ids = [m.message_id for m in scored]
    if chat_ids != scored_ids:
        missing = len(set(chat_ids) - set(scored_ids))
        extra = len(set(scored_ids) - set(chat_ids))
        return [f"chat-scored differs from chat: {missing} message(s) missing, {extra} extra"]
    for original, with_sentiment in zip(chat, scored, strict=True):
        plain = with_sentiment.model_dump(mode="json", exclude={"sentiment"})
        if original.model_dump(mode="json") != plain:
            return [f"chat-scored turn {original.turn} differs from its chat message"]
    return []


def missing_fields(what: str, model: type[BaseModel], raw: dict) -> list[str]:
    """The fields of `model` (the documented layout) that the Redis document lacks."""
    missing = sorted(set(model.model_fields) - set(raw))
    return [f"{what} lacks {', '.join(missing)}"] if missing else []


def field_problems(what: str, got: BaseModel, want: BaseModel) -> list[str]:
    """The fields set in `want` (a model of the same Redis document) that `got` differs in."""
    return [
        f"{what} {name}={getattr(got, name)!r}, expected {getattr(want, name)!r}"
        for name in sorted(want.model_fields_set)
        if getattr(got, name) != getattr(want, name)
    ]


def _redis_problems(
    cid: str, scored: list[ScoredMessage], state: RedisState, recent_limit: int
) -> list[str]:
    raw = state.conversations.get(cid)
    if raw is None:
        return ["no conversation value in Redis"]
    value = Conversation.model_validate(raw)
    ended = bool(scored) and scored[-1].final
    expected = Conversation(
        messages=len(scored),
        last_turn=scored[-1].turn if scored else None,
        status="ended" if ended else "active",
        end_reason=scored[-1].end_reason if ended else None,
        sentiment_sum_micro=sum(round(m.sentiment.score * SCORE_SCALE) for m in scored),
        prompt_tokens=sum(m.prompt_tokens for m in scored),
        completion_tokens=sum(m.completion_tokens for m in scored),
    )
    problems = missing_fields("Redis conversation", Conversation, raw)
    problems += field_problems("Redis", value, expected)
    recent = [m.message_id for m in value.recent]
    want_recent = [m.message_id for m in scored][-recent_limit:]
    if recent != want_recent:
        problems.append(f"Redis recent messages {len(recent)} differ from chat-scored")
    in_active, in_ended = cid in state.active, cid in state.ended
    if (ended, in_active, in_ended) not in {(True, False, True), (False, True, False)}:
        problems.append(f"Redis sets: active={in_active} ended={in_ended}, ended is {ended}")
    return problems


def expected_fleet(conversations: dict[str, list[ScoredMessage]]) -> Fleet:
    """The fleet totals recomputed from first copies of scored messages (independent code).

    Only the fields recomputed are set (`model_fields_set`); of each mood and product group,
    `conversations` and `messages`.
    """
    messages = [m for conversation in conversations.values() for m in conversation]
    ended = [c for c in conversations.values() if c and c[-1].final]
    score = sum(round(m.sentiment.score * SCORE_SCALE) for m in messages)
    groups: dict[str, dict[str, FleetGroup]] = {"mood": {}, "product": {}}
    for conversation in conversations.values():
        persona = conversation[0].customer
        for name, value in (("mood", persona.mood), ("product", persona.product)):
            group = groups[name].setdefault(value, FleetGroup(conversations=0, messages=0))
            group.conversations += 1
            group.messages += len(conversation)
    return Fleet(
        started=len(conversations),
        ended=len(ended),
        active=len(conversations) - len(ended),
        abandoned=0,
        messages=len(messages),
        prompt_tokens=sum(m.prompt_tokens for m in messages),
        completion_tokens=sum(m.completion_tokens for m in messages),
        sentiment_avg=round(score / len(messages) / SCORE_SCALE, 6) if messages else None,
        end_reasons=dict(Counter(c[-1].end_reason or "unknown" for c in ended)),
        by_mood=groups["mood"],
        by_product=groups["product"],
    )


def _group_counts(groups: dict[str, FleetGroup], want: dict[str, FleetGroup]) -> dict:
    """Each group's fields that `want`'s groups set, as a comparable dict."""
    names = sorted({name for group in want.values() for name in group.model_fields_set})
    return {key: [getattr(group, name) for name in names] for key, group in groups.items()}


def _fleet_problems(want: Fleet, raw: dict | None) -> list[str]:
    if raw is None:
        return ["no fleet value in Redis"] if want.messages else []
    got = Fleet.model_validate(raw)
    exact = want.model_fields_set - {"sentiment_avg", "by_mood", "by_product"}
    problems = missing_fields("fleet", Fleet, raw)
    problems += [
        f"fleet {name}={getattr(got, name)!r}, recomputed {getattr(want, name)!r}"
        for name in sorted(exact)
        if getattr(got, name) != getattr(want, name)
    ]
    avg, want_avg = got.sentiment_avg, want.sentiment_avg
    if (avg is None) != (want_avg is None) or (avg is not None and abs(avg - want_avg) > 2e-6):
        problems.append(f"fleet sentiment_avg={avg!r}, recomputed {want_avg!r}")
    for name in ("by_mood", "by_product"):
        have = _group_counts(getattr(got, name), getattr(want, name))
        recomputed = _group_counts(getattr(want, name), getattr(want, name))
        if have != recomputed:
            problems.append(f"fleet {name} {have}, recomputed {recomputed}")
    return problems


def verify(
    snap: Snapshot,
    config: RunConfig,
    *,
    skip_message_ids: set[str] | None = None,
    skip_conversations: set[str] | None = None,
    stalled: set[str] | None = None,
    recent_limit: int = 50,
) -> Verification:
    """Check chat, chat-scored and Redis against each other, per conversation and in total.

    A conversation is exact when, comparing first copies per message_id: its turns run from 0
    without gaps, roles alternate and the persona holds; every chat message is in chat-scored
    (same fields) and nothing else is; its Redis value counts exactly those messages; if it
    ended, it has an end_reason and its replacement exists; it was seeded or replaces an ended
    one; and it did not stall. In progress counts as exact when all of that holds for the turns
    so far. The fleet totals must equal a recomputation from chat-scored, and exactly
    `config.conversations` conversations must be in progress (neither leaked nor multiplied).
    Poison injected on purpose is left out by message_id or conversation id.
    """
    skip_ids = skip_message_ids or set()
    skip_convs = skip_conversations or set()
    settings = ServiceSettings()
    result = Verification(dead_letters=len(snap.dead_letters))
    chat_all, result.invalid_records["chat"] = _parsed(snap.chat, settings.chat_topic, "chat")
    scored_all, result.invalid_records["chat-scored"] = _parsed(
        snap.scored, settings.scored_topic, "scored"
    )
    chat, raw, unique, conflicts = _first_copies(chat_all, skip_ids, skip_convs)
    result.records["chat"], result.duplicates_raw["chat"] = raw, raw - unique
    result.conflicting_duplicates += conflicts
    scored, raw, unique, conflicts = _first_copies(scored_all, skip_ids, skip_convs)
    result.records["chat-scored"], result.duplicates_raw["chat-scored"] = raw, raw - unique
    result.conflicting_duplicates += conflicts

    ended = {cid for cid, c in chat.items() if c[-1].final}
    seeds = set(config.seeds())
    replacements = {successor_id(cid) for cid in ended}
    expected_ids = seeds | replacements
    for cid in sorted(set(chat) | expected_ids, key=lambda c: (c not in seeds, c)):
        conversation = chat.get(cid, [])
        problems = []
        if not conversation:
            problems.append("missing from chat (a seed or the replacement of an ended one)")
        else:
            problems += transcript_problems(conversation)
            problems += _scored_problems(conversation, scored.get(cid, []))
            problems += _redis_problems(cid, scored.get(cid, []), snap.redis, recent_limit)
            result.messages += len(conversation)
            if cid in ended:
                result.ended += 1
                result.end_reasons[conversation[-1].end_reason] += 1
                if successor_id(cid) not in chat:
                    problems.append("ended, but its replacement conversation never started")
            else:
                result.in_progress += 1
        if cid not in expected_ids:
            problems.append("neither seeded nor the replacement of an ended conversation")
        if stalled and cid in stalled:
            problems.append("stalled: no new turn after the kills stopped")
        result.conversations += 1
        if problems:
            result.problems[cid] = problems
        else:
            result.exact += 1

    for topic, count in snap.hidden.items():
        # not a failure here: the services of the embedded stack read uncommitted (and read
        # these); Kafka would abort such a transaction after transaction.timeout.ms
        result.notes.append(
            f"{count} {topic} record(s) behind a transaction still open: Kafka's read_committed "
            "readers would wait for it to time out"
        )
    if result.in_progress != config.conversations:
        result.global_problems.append(
            f"{result.in_progress} conversations in progress, target {config.conversations}"
        )
    strangers = sorted(
        (set(snap.redis.conversations) | snap.redis.active | snap.redis.ended) - set(chat)
    )
    if strangers:
        result.global_problems.append(
            f"Redis holds {len(strangers)} conversation(s) that are not in chat: {strangers[:3]}"
        )
    healthy_scored = {cid: scored.get(cid, []) for cid in chat if scored.get(cid)}
    result.global_problems += _fleet_problems(expected_fleet(healthy_scored), snap.redis.fleet)
    return result


def last_turns(
    records: list[Record], skip_message_ids: set[str] | None = None
) -> dict[str, tuple[int, bool]]:
    """Per conversation in `chat` records: (last turn, whether it ended)."""
    skip = skip_message_ids or set()
    out: dict[str, tuple[int, bool]] = {}
    for record in records:
        message = parse_chat(record.value, service=CHECKER, source_topic="chat", key=record.key)
        if isinstance(message, DeadLetter) or message.message_id in skip:
            continue
        turn, final = out.get(message.conversation_id, (-1, False))
        if message.turn >= turn:
            out[message.conversation_id] = (message.turn, final or message.final)
    return out


def wait_for_progress(
    stack: Stack,
    timeout: float,
    skip_conversations: set[str] | None = None,
    skip_message_ids: set[str] | None = None,
    say: Say = print,
) -> set[str]:
    """Conversations in progress now that get no new turn within `timeout` s (stalled ones)."""
    topic = ServiceSettings().chat_topic
    skip = skip_conversations or set()

    def turns() -> dict[str, tuple[int, bool]]:
        return last_turns(read_records(stack.broker.address, topic), skip_message_ids)

    def pending() -> set[str]:
        now = turns()
        return {
            cid
            for cid, (turn, final) in before.items()
            if not final and cid not in skip and now.get(cid, (turn, False))[0] <= turn
        }

    before = turns()
    left: set[str] = set()

    def advanced() -> bool:
        left.clear()
        left.update(pending())
        return not left

    supervise_for(stack, timeout, say, until=advanced)
    return set(left)


def drain_and_verify(
    stack: Stack,
    config: RunConfig,
    timeout: float,
    say: Say = print,
    **options,
) -> tuple[Verification, Snapshot]:
    """Verify repeatedly until it passes (the pipeline drained) or `timeout` s have passed."""
    from supportsim.sinks.live_view import AggregatorSettings

    options.setdefault("recent_limit", AggregatorSettings().recent_messages)
    deadline = time.monotonic() + timeout
    while True:
        snap = snapshot(stack, config.key_prefix)
        result = verify(snap, config, **options)
        if result.ok or time.monotonic() >= deadline:
            return result, snap
        supervise_for(stack, 3.0, say)
