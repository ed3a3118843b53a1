"""Poison records: bad inputs injected into a running pipeline, and what became of each."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import (
    KafkaException,
    Producer,
)

from supportsim.contract.messages import (
    ChatMessage,
    DeadLetter,
    ScoredMessage,
    new_id,
    now_ms,
)
from supportsim.local.stack import Stack
from supportsim.settings import ServiceSettings
from tests.harness.oracle import Verification, _parsed, drain_and_verify, wait_for_progress
from tests.harness.readback import (
    Snapshot,
    dead_letters,
    read_records,
    snapshot,
)
from tests.harness.runs import (
    PIPELINE,
    RunConfig,
    Say,
    process_table,
    restarts,
    stop_bots,
    supervise_for,
)


@dataclass
class Poison:
    """One bad record to inject, and who must dead-letter it (empty: ignored as a duplicate)."""

    kind: str
    topic: str
    key: bytes | None
    value: bytes | None
    expect: frozenset[str]
    message_id: str | None = None
    conversation_id: str | None = None
    partition: int | None = None
    offset: int | None = None
    error: str | None = None  # why it could not be produced, if it could not


@dataclass
class PoisonOutcome:
    """Where one poison record went."""

    poison: Poison
    dead_lettered_by: dict[str, str]
    missing: set[str]
    unexpected: set[str]
    evidence: str = ""

    @property
    def ok(self) -> bool:
        """Dead-lettered by every service that must, by no other; or rejected at produce time."""
        if self.poison.error is not None:
            return True
        if not self.poison.expect:
            return not self.dead_lettered_by and bool(self.evidence)
        return not self.missing and not self.unexpected and all(self.dead_lettered_by.values())

    def line(self) -> str:
        """One line for the report."""
        p = self.poison
        where = f"{p.topic}[{p.partition}]@{p.offset}" if p.offset is not None else p.topic
        if p.error is not None:
            return f"{p.kind:<22} {where:<22} rejected at produce time: {p.error}"
        if not p.expect:
            verdict = "ignored as duplicate" if self.ok else "NOT PROVEN IGNORED"
            return f"{p.kind:<22} {where:<22} {verdict}: {self.evidence or self.dead_lettered_by}"
        head = "ok" if self.ok else f"MISSING {sorted(self.missing)} UNEXPECTED {self.unexpected}"
        reasons = "; ".join(f"{s}: {e[:70]}" for s, e in sorted(self.dead_lettered_by.items()))
        evidence = f" ({self.evidence})" if self.evidence else ""
        return f"{p.kind:<22} {where:<22} {head}{evidence} | {reasons}"


HUGE_TEXT_CHARS = 1024 * 1024


def poison_catalogue(
    chat_victims: list[ChatMessage],
    scored_victims: list[ScoredMessage],
    max_turns: int,
) -> list[Poison]:
    """Every kind of bad input, for `chat` and for `chat-scored`.

    Victims are healthy messages of conversations in progress (3 conversations per topic): the
    poison is keyed like the first (so it lands in its partition, between its turns), the
    duplicates copy the second and third, and the out-of-order turn targets the first one's
    conversation. Parse failures must be dead-lettered by every reader of the topic; a
    well-formed message that makes no sense in its conversation passes the stateless scorer, so
    the stateful consumers (the bots, the aggregator) must dead-letter it; a duplicate must be
    ignored.
    """
    settings = ServiceSettings()
    chat_readers = frozenset({"ai_customer", "ai_support_agent", "sentiment_analysis"})
    chat_context = frozenset({"ai_customer", "ai_support_agent", "redis_aggregator"})
    scored_readers = frozenset({"redis_aggregator"})
    return _poisons(
        settings.chat_topic, chat_victims, chat_readers, chat_context, max_turns
    ) + _poisons(settings.scored_topic, scored_victims, scored_readers, scored_readers, max_turns)


def _poisons(
    topic: str,
    victims: list[ChatMessage],
    readers: frozenset[str],
    context: frozenset[str],
    max_turns: int,
) -> list[Poison]:
    base, dup_victim, conflict_victim = victims[:3]
    key = base.key

    def fresh(**changes) -> dict:
        data = base.model_dump(mode="json")
        data.update(message_id=new_id(), timestamp_ms=now_ms(), **changes)
        return data

    def poison(kind: str, data: dict | bytes | None, expect: frozenset[str], rkey=key) -> Poison:
        value = json.dumps(data).encode() if isinstance(data, dict) else data
        fields = data if isinstance(data, dict) else {}
        return Poison(
            kind,
            topic,
            rkey,
            value,
            expect,
            message_id=fields.get("message_id"),
            conversation_id=fields.get("conversation_id"),
        )

    missing = fresh()
    for name in ("turn", "text", "customer"):
        del missing[name]
    invalid_utf8 = json.dumps(fresh(text="PLACEHOLDER")).encode()
    stranger = fresh(conversation_id=new_id(), turn=5, role="customer")
    duplicate = dup_victim.model_dump(mode="json")
    conflicting = conflict_victim.model_dump(mode="json")
    conflicting["text"] = "a different text under a message_id that was already used"
    return [
        poison("invalid_json", b'{"conversation_id": "' + key + b'", "turn": 1, "role": ', readers),
        poison("not_an_object", b'["a", "JSON", "array"]', readers),
        poison(
            "wrong_types", fresh(turn=str(base.turn + 1), final="yes", customer="Dana"), readers
        ),
        poison("missing_fields", missing, readers),
        poison("unknown_role", fresh(role="supervisor"), readers),
        poison("huge_text_1mb", fresh(turn=base.turn + 1, text="x" * HUGE_TEXT_CHARS), readers),
        poison(
            "invalid_utf8",
            invalid_utf8.replace(b"PLACEHOLDER", b"bad \xff\xfe\xc3( bytes"),
            readers,
        ),
        poison("empty_value", None, readers),
        poison("key_mismatch", fresh(), readers, rkey=new_id().encode()),
        poison(
            "unknown_conversation", stranger, context, rkey=stranger["conversation_id"].encode()
        ),
        poison("out_of_order_turn", fresh(turn=max_turns + 50, role="agent"), context),
        poison("duplicate_message_id", duplicate, frozenset(), rkey=dup_victim.key),
        poison("duplicate_other_text", conflicting, frozenset(), rkey=conflict_victim.key),
    ]


def inject(address: str, poisons: list[Poison], max_bytes: int = 10_000_000) -> None:
    """Produce every poison record, noting where it landed or why it was refused."""
    # the client's own cap (message.max.bytes, default 1,000,000) is raised so the broker decides;
    # murmur2 is what Quix Streams' producers use, so a key lands in its conversation's partition
    producer = Producer(
        {
            "bootstrap.servers": address,
            "linger.ms": 5,
            "message.max.bytes": max_bytes,
            "partitioner": "murmur2",
        }
    )

    def delivered(poison: Poison) -> Callable:
        def callback(err, message) -> None:
            if err is not None:
                poison.error = str(err)
            else:
                poison.partition, poison.offset = message.partition(), message.offset()

        return callback

    for poison in poisons:
        try:
            producer.produce(
                poison.topic, key=poison.key, value=poison.value, on_delivery=delivered(poison)
            )
        except (KafkaException, BufferError) as exc:
            poison.error = f"producer refused it: {exc}"
        producer.poll(0)
    if producer.flush(30):
        raise TimeoutError("poison records not delivered within 30 s")


def _dead_letter_message_id(letter: DeadLetter) -> str | None:
    if letter.value_encoding != "utf-8":
        return None
    with contextlib.suppress(ValueError):
        data = json.loads(letter.value)
        if isinstance(data, dict) and isinstance(data.get("message_id"), str):
            return data["message_id"]
    return None


def poison_outcomes(
    poisons: list[Poison], letters: list[DeadLetter], logs: dict[str, str]
) -> list[PoisonOutcome]:
    """Match dead letters to the poison records; find duplicates' "ignored" lines in the logs.

    A dead letter belongs to a poison record when it names the same topic, partition and offset,
    or (dead letters written by a stateful step, which carry the message but not always its
    offset) the same message_id. `logs` maps a service name to its log text.
    """
    outcomes = []
    for poison in poisons:
        by: dict[str, str] = {}
        for letter in letters:
            same_place = (
                poison.offset is not None
                and letter.source_topic == poison.topic
                and letter.partition == poison.partition
                and letter.offset == poison.offset
            )
            same_message = poison.message_id is not None and (
                _dead_letter_message_id(letter) == poison.message_id
            )
            if same_place or same_message:
                by.setdefault(letter.service, letter.error)
        outcome = PoisonOutcome(
            poison, by, missing=set(poison.expect) - set(by), unexpected=set(by) - poison.expect
        )
        if not poison.expect and poison.message_id:
            lines = [
                line
                for text in logs.values()
                for line in text.splitlines()
                if poison.message_id in line and "ignor" in line
            ]
            outcome.evidence = lines[0].split(": ", 1)[-1][:160] if lines else ""
        elif outcome.missing and poison.offset is not None:
            # did the service see it? tells a record it never read from a letter that got lost
            place = f"{poison.topic}[{poison.partition}]@{poison.offset}:"
            seen = [s for s in sorted(outcome.missing) if place in logs.get(s, "")]
            outcome.evidence = (
                f"logged as dead letter by {seen} but not in the topic"
                if seen
                else "not in the service log either: never read"
            )
        outcomes.append(outcome)
    return outcomes


def service_logs(stack: Stack, names: tuple[str, ...] = PIPELINE) -> dict[str, str]:
    """Log text per service (replicas concatenated)."""
    logs: dict[str, str] = {}
    for replica in stack.replicas:
        if replica.spec.name in names and replica.log_path.exists():
            text = replica.log_path.read_text(errors="replace")
            logs[replica.spec.name] = logs.get(replica.spec.name, "") + text
    return logs


def pick_victims(snap: Snapshot, count: int = 3) -> tuple[list[ChatMessage], list[ScoredMessage]]:
    """Latest messages of `count` conversations in progress, from chat and from chat-scored.

    Raises LookupError when fewer than `count` conversations in progress have reached both.
    """
    chat, _ = _parsed(snap.chat, "chat", "chat")
    scored, _ = _parsed(snap.scored, "chat-scored", "scored")
    ended = {m.conversation_id for m in chat if m.final}
    latest_chat = {m.conversation_id: m for m in chat if m.conversation_id not in ended}
    latest_scored = {m.conversation_id: m for m in scored if m.conversation_id in latest_chat}
    ids = sorted(latest_scored)[:count]
    if len(ids) < count:
        raise LookupError(f"need {count} conversations in progress in chat and chat-scored")
    return [latest_chat[cid] for cid in ids], [latest_scored[cid] for cid in ids]


@dataclass
class PoisonRun:
    """The outcome of :func:`run_poison`."""

    outcomes: list[PoisonOutcome]
    verification: Verification
    restarts: dict[str, int]
    pids_before: dict[str, int]
    pids_after: dict[str, int]
    down: list[str]

    @property
    def handled(self) -> int:
        """Poison records that went where they must (dead letters, or ignored as duplicates)."""
        return sum(o.ok for o in self.outcomes)

    @property
    def ok(self) -> bool:
        """Every poison handled, no restart, the same PIDs, healthy conversations exact."""
        return (
            self.handled == len(self.outcomes)
            and not any(self.restarts.values())
            and self.pids_before == self.pids_after
            and not self.down
            and self.verification.ok
        )

    def lines(self) -> list[str]:
        """A human summary: one line per poison record, then the healthy traffic."""
        out = [o.line() for o in self.outcomes]
        out.append(
            f"poison handled: {self.handled}/{len(self.outcomes)}; restarts: "
            f"{sum(self.restarts.values())}; PIDs unchanged: {self.pids_before == self.pids_after}"
            + (f"; not running: {self.down}" if self.down else "")
        )
        return out + self.verification.lines()


def run_poison(
    stack: Stack, config: RunConfig, say: Say = print, timeout: float = 90.0
) -> PoisonRun:
    """Inject :func:`poison_catalogue` into a running stack and check where everything went.

    Waits for the expected dead letters, checks that conversations keep going, that no replica
    restarted or changed PID, then stops the bots, lets the rest drain and verifies the healthy
    conversations (the poison left out by message_id and conversation id).
    """
    for attempt in range(10):
        try:
            chat_victims, scored_victims = pick_victims(snapshot(stack, config.key_prefix))
            break
        except LookupError:
            if attempt == 9:
                raise
            supervise_for(stack, 3.0, say)
    pids_before = process_table(stack)
    poisons = poison_catalogue(chat_victims, scored_victims, config.max_turns)
    inject(stack.broker.address, poisons)
    for poison in poisons:
        if poison.error:
            say(f"poison {poison.kind} on {poison.topic} refused at produce time: {poison.error}")
    say(f"injected {sum(p.error is None for p in poisons)} poison records")
    dead_topic = ServiceSettings().dead_letter_topic

    def all_dead_lettered() -> bool:
        letters = dead_letters(read_records(stack.broker.address, dead_topic))
        return not any(o.missing for o in poison_outcomes(poisons, letters, {}))

    supervise_for(stack, timeout, say, until=all_dead_lettered)
    skip_ids = {p.message_id for p in poisons if p.expect and p.message_id}
    skip_conversations = {p.conversation_id for p in poisons if p.kind == "unknown_conversation"}
    stalled = wait_for_progress(stack, timeout, skip_conversations, skip_ids, say)
    pids_after = process_table(stack)
    down = [r.label for r in stack.replicas if not (r.alive() or r.finished)]
    stop_bots(stack)
    verification, snap = drain_and_verify(
        stack,
        config,
        timeout,
        say,
        skip_message_ids=skip_ids,
        skip_conversations=skip_conversations,
        stalled=stalled,
    )
    outcomes = poison_outcomes(poisons, dead_letters(snap.dead_letters), service_logs(stack))
    return PoisonRun(outcomes, verification, restarts(stack), pids_before, pids_after, down)
