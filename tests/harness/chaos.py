"""Chaos, poison and load runs against the embedded stack: start it, break it, check it.

Used by `bench/chaos.py`, `bench/load.py` and the integration tests. The pieces:

- :func:`running_stack` starts broker, Redis and every pipeline service (scripted bots, no
  dashboard) with a unique Redis key prefix, and stops everything afterwards;
- :class:`KillDriver` SIGKILLs a random service process every few seconds (the stack's
  supervisor restarts it); :func:`stop_bots` ends the conversations' source so the rest drains;
- :func:`snapshot` reads `chat`, `chat-scored`, the dead letters and Redis, and :func:`verify`
  checks them against each other with its own recomputation of the aggregates;
- :func:`poison_catalogue`, :func:`inject` and :func:`poison_outcomes` feed every kind of bad
  input to the running system and find where each one went;
- :class:`LatencyWatcher` and :func:`service_rss` measure the load run.

Duplicates are expected, and counted, never hidden: the embedded Tansu broker does not filter
aborted transactions, so after a SIGKILL a half-done transaction's records can be visible *and*
be redone by the next owner. Every message_id is deterministic per (conversation, turn), so the
checks compare per message_id (first copy kept, as every consumer does) and report the raw
duplicate counts next to the exact ones.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from supportsim.contract.messages import (
    ChatMessage,
    DeadLetter,
    ScoredMessage,
    new_id,
    now_ms,
    parse_chat,
    parse_scored,
)
from supportsim.contract.protocol import slot_id, successor_id
from supportsim.local.broker import LOCAL_ISOLATION_LEVEL
from supportsim.local.stack import SERVICES, Replica, ServiceSpec, Stack
from supportsim.settings import ServiceSettings

BOTS = ("ai_customer", "ai_support_agent")
# every service of the pipeline, in start order; the dashboard and optional sinks stay out
PIPELINE = (
    "sentiment_analysis",
    "redis_aggregator",
    "ai_support_agent",
    "ai_customer",
    "conversation_starter",
)
CHECKER = "chaos-check"
SCORE_SCALE = 1_000_000  # the aggregates sum scores in integer millionths (docs/redis-keys.md)

Say = Callable[[str], None]


# --------------------------------------------------------------------------- the stack


@dataclass
class RunConfig:
    """What a chaos, poison or load run starts: scripted bots and their pace."""

    conversations: int = 6
    max_turns: int = 8
    think_time_s: float = 0.1
    goodbye_after: int = 6
    replicas: dict[str, int] = field(default_factory=dict)
    key_prefix: str = field(default_factory=lambda: f"chaos-{new_id()[:8]}:")
    seed_namespace: str = field(default_factory=lambda: f"chaos-{new_id()[:8]}")
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """Environment of every service process."""
        return {
            "BOT_MODE": "scripted",
            "CONVERSATIONS": str(self.conversations),
            "MAX_TURNS": str(self.max_turns),
            "SCRIPTED_THINK_TIME_S": str(self.think_time_s),
            "SCRIPTED_GOODBYE_AFTER": str(self.goodbye_after),
            "REDIS_KEY_PREFIX": self.key_prefix,
            "SEED_NAMESPACE": self.seed_namespace,
            **self.extra_env,
        }

    def seeds(self) -> list[str]:
        """Conversation ids of the seeded slots (the starter derives them the same way)."""
        return [slot_id(self.seed_namespace, slot) for slot in range(self.conversations)]


def pipeline_services() -> list[ServiceSpec]:
    """The registered specs of the pipeline services (bots, starter, sentiment, aggregator)."""
    by_name = {spec.name: spec for spec in SERVICES}
    return [by_name[name] for name in PIPELINE if name in by_name]


@contextlib.contextmanager
def running_stack(
    run_dir: Path, config: RunConfig, redis_url: str, say: Say = print
) -> Iterator[Stack]:
    """Start the pipeline with `config`; stop it and delete its Redis keys afterwards."""
    saved = {
        name: os.environ.get(name)
        for name in ("REDIS_KEY_PREFIX", "KAFKA_BROKER_ADDRESS", "KAFKA_SESSION_TIMEOUT_MS")
    }
    # Stack.clear_earlier_run reads the prefix from this process's environment: never the default
    os.environ["REDIS_KEY_PREFIX"] = config.key_prefix
    stack = Stack(
        run_dir,
        redis_url=redis_url,
        replicas=config.replicas,
        services=pipeline_services(),
        extra_env=config.env(),
        say=say,
    )
    try:
        stack.start()
        yield stack
    finally:
        with contextlib.suppress(redis.RedisError, OSError):
            delete_keys(stack.redis.url, config.key_prefix)
        stack.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def delete_keys(url: str, prefix: str) -> int:
    """Delete the Redis keys under `prefix` (a run's own, unique prefix); return how many."""
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(f"{prefix}*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    return len(keys)


def supervise_for(
    stack: Stack,
    seconds: float,
    say: Say = print,
    until: Callable[[], bool] | None = None,
    check_every: float = 2.0,
) -> bool:
    """Run the stack's supervisor for `seconds`, or until `until()` holds; return whether it did."""
    deadline = time.monotonic() + seconds
    next_check = 0.0
    while True:
        for event in stack.supervise():
            say(event)
        now = time.monotonic()
        if until is not None and now >= next_check:
            if until():
                return True
            next_check = now + check_every
        if now >= deadline:
            return until is None
        time.sleep(0.25)


def all_up(stack: Stack) -> bool:
    """True when every replica runs (a job counts once it finished)."""
    return all(r.alive() or r.finished for r in stack.replicas)


def fleet(stack: Stack, prefix: str) -> dict | None:
    """The aggregator's fleet totals in Redis (None before the first write)."""
    from supportsim.contract.redis_keys import RedisKeys

    raw = redis.Redis.from_url(stack.redis.url).get(RedisKeys(prefix).fleet)
    return json.loads(raw) if raw else None


def wait_for_flow(
    stack: Stack, config: RunConfig, messages: int, timeout: float, say: Say = print
) -> bool:
    """Wait until Redis counts `messages` messages: the whole pipeline works end to end."""

    def flowing() -> bool:
        totals = fleet(stack, config.key_prefix)
        return bool(totals) and totals["messages"] >= messages

    return supervise_for(stack, timeout, say, until=flowing)


def stop_services(stack: Stack, names: tuple[str, ...] = BOTS) -> None:
    """Stop every replica of `names` gracefully, for good (the supervisor leaves them down)."""
    replicas = [r for r in stack.replicas if r.spec.name in names]
    for replica in replicas:
        replica.finished = True
    for replica in replicas:
        if replica.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(replica.process.pid, signal.SIGTERM)
    for replica in replicas:
        replica.stop()


def stop_bots(stack: Stack) -> None:
    """Stop both bots, so `chat` stops growing and the rest of the pipeline can drain."""
    stop_services(stack, BOTS)


def process_table(stack: Stack) -> dict[str, int]:
    """PIDs of the service replicas, as in the run folder's processes.json."""
    table = json.loads((stack.run_dir / "processes.json").read_text())
    return dict(table["services"])


def restarts(stack: Stack) -> dict[str, int]:
    """Restarts per replica label."""
    return {r.label: r.restarts for r in stack.replicas}


# --------------------------------------------------------------------------- kills


@dataclass
class Kill:
    """One SIGKILL delivered to a service process."""

    at_s: float
    service: str
    replica: str
    pid: int


class KillDriver:
    """SIGKILLs service processes of a running stack, spreading kills evenly over services.

    Each call to :meth:`kill_one` picks, among services with a killable replica, one of those
    killed least so far, and kills one of its replicas that has been up for `min_uptime_s` (so
    it is at work, not starting). A job (the conversation starter) that already finished is
    launched again, as an operator re-running it would, and killed while it seeds.
    """

    def __init__(
        self,
        stack: Stack,
        rng: random.Random,
        services: tuple[str, ...] = PIPELINE,
        min_uptime_s: float = 5.0,
        say: Say = print,
    ):
        self.stack = stack
        self.rng = rng
        self.services = tuple(s for s in services if any(r.spec.name == s for r in stack.replicas))
        self.min_uptime_s = min_uptime_s
        self.say = say
        self.kills: Counter[str] = Counter({name: 0 for name in self.services})
        self.history: list[Kill] = []
        self.started = time.monotonic()
        self._first_seen: dict[int, float] = {}
        self._job_delay = 0.6

    def observe(self) -> None:
        """Note when each running process was first seen (its uptime starts there)."""
        now = time.monotonic()
        for replica in self.stack.replicas:
            if replica.alive():
                self._first_seen.setdefault(replica.process.pid, now)

    def killable(self) -> dict[str, list[Replica]]:
        """Replicas that may be killed now, per service."""
        self.observe()
        now = time.monotonic()
        found: dict[str, list[Replica]] = {}
        for replica in self.stack.replicas:
            name = replica.spec.name
            if name not in self.services:
                continue
            if replica.spec.job:
                ready = replica.finished and not replica.alive()
            else:
                ready = replica.alive() and (
                    now - self._first_seen[replica.process.pid] >= self.min_uptime_s
                )
            if ready:
                found.setdefault(name, []).append(replica)
        return found

    def kill_one(self) -> Kill | None:
        """Kill one process (see the class docstring); None when nothing is killable now."""
        candidates = self.killable()
        if not candidates:
            return None
        fewest = min(self.kills[name] for name in candidates)
        name = self.rng.choice(sorted(n for n in candidates if self.kills[n] == fewest))
        replica = self.rng.choice(candidates[name])
        if replica.spec.job:
            replica.finished = False
            replica.start()  # the job runs again; kill it while it seeds
            time.sleep(self._job_delay * self.rng.uniform(0.5, 1.0))
            if not replica.alive():
                self._job_delay /= 2  # it finished first: catch the next run earlier
                self.say(f"{replica.label} finished before its kill; trying again later")
                return None
        pid = replica.process.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # pid leads its own process group: ours alone
        replica.process.wait()
        kill = Kill(round(time.monotonic() - self.started, 1), name, replica.label, pid)
        self.kills[name] += 1
        self.history.append(kill)
        self.say(f"SIGKILL {replica.label} (pid {pid}); kills so far: {self.summary()}")
        return kill

    def summary(self) -> str:
        """Kills per service, as `name:n,name:n`."""
        return ",".join(f"{name}:{self.kills[name]}" for name in self.services)


def run_chaos(
    stack: Stack,
    driver: KillDriver,
    duration_s: float,
    interval_s: tuple[float, float] = (3.0, 7.0),
    min_kills: int = 2,
    max_extra_s: float = 120.0,
    say: Say = print,
) -> None:
    """Kill a random service every `interval_s` seconds for `duration_s`, supervising meanwhile.

    Goes on past `duration_s` (up to `max_extra_s`) until every service was killed `min_kills`
    times.
    """
    started = time.monotonic()
    next_kill = started + driver.rng.uniform(*interval_s)
    while True:
        for event in stack.supervise():
            say(event)
        now = time.monotonic()
        enough = min(driver.kills.values(), default=min_kills) >= min_kills
        if now - started >= duration_s and (enough or now - started >= duration_s + max_extra_s):
            return
        if now >= next_kill:
            driver.kill_one()
            next_kill = time.monotonic() + driver.rng.uniform(*interval_s)
        time.sleep(0.25)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Record:
    """One Kafka record as read back."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def read_records(
    address: str, topic: str, timeout: float = 60.0, isolation: str = LOCAL_ISOLATION_LEVEL
) -> list[Record]:
    """Every record of `topic` up to its end, in (partition, offset) order.

    The default `isolation` reads as the services of the embedded stack do; `read_committed`
    reads up to the first transaction still open, if any. Each partition is read until the
    client reports its end (partition EOF): Tansu's ListOffsets answers are not usable as an
    end (it reported 0 on busy `chat` partitions), so watermarks are not used.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": address,
            "group.id": f"{CHECKER}-{new_id()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": isolation,
            # Tansu holds a fetch for this long even when it has data, and a partition that
            # transactions touched holds thousands of commit markers (the dead letters'
            # partition: 3,000 offsets for 44 records); 500 ms each, it would never end
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        info = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if info is None or info.error is not None:
            return []
        pending = set(info.partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in pending])
        records: list[Record] = []
        deadline = time.monotonic() + timeout
        last_error = None
        while pending:
            if time.monotonic() > deadline:
                positions = consumer.position([TopicPartition(topic, p) for p in sorted(pending)])
                raise TimeoutError(
                    f"{topic}: partitions {sorted(pending)} not read to their end (positions "
                    f"{[(p.partition, p.offset) for p in positions]}, {len(records)} records "
                    f"read, last error: {last_error})"
                )
            for message in consumer.consume(1000, 0.5):
                if message.error() is not None:
                    if message.error().code() == KafkaError._PARTITION_EOF:
                        pending.discard(message.partition())
                    else:
                        last_error = message.error()
                    continue
                records.append(
                    Record(message.partition(), message.offset(), message.key(), message.value())
                )
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


@dataclass
class RedisState:
    """What the aggregator wrote under one key prefix."""

    fleet: dict | None
    conversations: dict[str, dict]
    active: set[str]
    ended: set[str]


def read_redis(url: str, prefix: str) -> RedisState:
    """Every aggregate under `prefix`."""
    from supportsim.contract.redis_keys import RedisKeys

    keys = RedisKeys(prefix)
    client = redis.Redis.from_url(url)
    marker = keys.conversation("")
    names = sorted(client.scan_iter(f"{marker}*", count=1000))
    conversations = {}
    for start in range(0, len(names), 500):
        chunk = names[start : start + 500]
        for name, raw in zip(chunk, client.mget(chunk), strict=True):
            if raw is not None:
                conversations[name.decode()[len(marker) :]] = json.loads(raw)
    raw_fleet = client.get(keys.fleet)
    return RedisState(
        fleet=json.loads(raw_fleet) if raw_fleet else None,
        conversations=conversations,
        active={m.decode() for m in client.zrange(keys.active, 0, -1)},
        ended={m.decode() for m in client.zrange(keys.ended, 0, -1)},
    )


@dataclass
class Snapshot:
    """The three topics and Redis, read at one moment."""

    chat: list[Record]
    scored: list[Record]
    dead_letters: list[Record]
    redis: RedisState
    # per topic: records that Kafka's read_committed readers would not reach (behind a transaction
    # left open); the services of the embedded stack read uncommitted
    hidden: dict[str, int] = field(default_factory=dict)


def snapshot(stack: Stack, prefix: str) -> Snapshot:
    """Read the topics (to their current ends) and the Redis aggregates of a running stack."""
    settings = ServiceSettings()
    address = stack.broker.address
    topics = {
        "chat": settings.chat_topic,
        "chat-scored": settings.scored_topic,
        "chat-dead-letters": settings.dead_letter_topic,
    }
    records = {name: read_records(address, topic) for name, topic in topics.items()}
    # what Kafka's read_committed readers would not reach: behind a transaction left open
    hidden = {
        name: len(records[name]) - len(read_records(address, topic, isolation="read_committed"))
        for name, topic in topics.items()
    }
    return Snapshot(
        chat=records["chat"],
        scored=records["chat-scored"],
        dead_letters=records["chat-dead-letters"],
        redis=read_redis(stack.redis.url, prefix),
        hidden={name: count for name, count in hidden.items() if count},
    )


def dead_letters(records: list[Record]) -> list[DeadLetter]:
    """Dead-letter records as models (a record that is not one is reported as such)."""
    out = []
    for record in records:
        try:
            out.append(DeadLetter.model_validate_json(record.value or b""))
        except ValueError as exc:
            out.append(
                DeadLetter(
                    source_topic="?",
                    value=repr(record.value[:200] if record.value else record.value),
                    error=f"unreadable dead letter: {exc}",
                    service="?",
                )
            )
    return out


# --------------------------------------------------------------------------- verification


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


def _redis_problems(
    cid: str, scored: list[ScoredMessage], state: RedisState, recent_limit: int
) -> list[str]:
    value = state.conversations.get(cid)
    if value is None:
        return ["no conversation value in Redis"]
    problems = []
    ended = bool(scored) and scored[-1].final
    expected = {
        "messages": len(scored),
        "last_turn": scored[-1].turn if scored else None,
        "status": "ended" if ended else "active",
        "end_reason": scored[-1].end_reason if ended else None,
        "sentiment_sum_micro": sum(round(m.sentiment.score * SCORE_SCALE) for m in scored),
        "prompt_tokens": sum(m.prompt_tokens for m in scored),
        "completion_tokens": sum(m.completion_tokens for m in scored),
    }
    for name, want in expected.items():
        if value.get(name) != want:
            problems.append(f"Redis {name}={value.get(name)!r}, expected {want!r}")
    recent = [m.get("message_id") for m in value.get("recent", [])]
    want_recent = [m.message_id for m in scored][-recent_limit:]
    if recent != want_recent:
        problems.append(f"Redis recent messages {len(recent)} differ from chat-scored")
    in_active, in_ended = cid in state.active, cid in state.ended
    if (ended, in_active, in_ended) not in {(True, False, True), (False, True, False)}:
        problems.append(f"Redis sets: active={in_active} ended={in_ended}, ended is {ended}")
    return problems


def expected_fleet(conversations: dict[str, list[ScoredMessage]]) -> dict:
    """The fleet totals recomputed from first copies of scored messages (independent code)."""
    messages = [m for conversation in conversations.values() for m in conversation]
    ended = [c for c in conversations.values() if c and c[-1].final]
    score = sum(round(m.sentiment.score * SCORE_SCALE) for m in messages)
    groups: dict[str, dict[str, list[int]]] = {"by_mood": {}, "by_product": {}}
    for conversation in conversations.values():
        persona = conversation[0].customer
        for name, value in (("by_mood", persona.mood), ("by_product", persona.product)):
            counts = groups[name].setdefault(value, [0, 0])
            counts[0] += 1
            counts[1] += len(conversation)
    return {
        "started": len(conversations),
        "ended": len(ended),
        "active": len(conversations) - len(ended),
        "abandoned": 0,
        "messages": len(messages),
        "prompt_tokens": sum(m.prompt_tokens for m in messages),
        "completion_tokens": sum(m.completion_tokens for m in messages),
        "sentiment_avg": round(score / len(messages) / SCORE_SCALE, 6) if messages else None,
        "end_reasons": dict(Counter(c[-1].end_reason or "unknown" for c in ended)),
        "by_mood": groups["by_mood"],
        "by_product": groups["by_product"],
    }


def _fleet_problems(want: dict, got: dict | None) -> list[str]:
    if got is None:
        return ["no fleet value in Redis"] if want["messages"] else []
    problems = []
    for name in ("started", "ended", "active", "abandoned", "messages"):
        if got.get(name) != want[name]:
            problems.append(f"fleet {name}={got.get(name)!r}, recomputed {want[name]!r}")
    for name in ("prompt_tokens", "completion_tokens", "end_reasons"):
        if got.get(name) != want[name]:
            problems.append(f"fleet {name}={got.get(name)!r}, recomputed {want[name]!r}")
    avg, want_avg = got.get("sentiment_avg"), want["sentiment_avg"]
    if (avg is None) != (want_avg is None) or (avg is not None and abs(avg - want_avg) > 2e-6):
        problems.append(f"fleet sentiment_avg={avg!r}, recomputed {want_avg!r}")
    for name in ("by_mood", "by_product"):
        have = {k: [v["conversations"], v["messages"]] for k, v in got.get(name, {}).items()}
        if have != want[name]:
            problems.append(
                f"fleet {name} (conversations, messages) {have}, recomputed {want[name]}"
            )
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


# --------------------------------------------------------------------------- poison


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


# --------------------------------------------------------------------------- load


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class LatencyWatcher:
    """Measures chat-to-Redis latency by polling the aggregator's conversation sets.

    `conversations:active` is scored by the timestamp of a conversation's latest message and
    `conversations:ended` by its final message's, written in the same Redis transaction as the
    conversation value; when a score changes, the message with that timestamp_ms (set by the
    bot when it wrote the message to `chat`) has just become visible in Redis.
    """

    def __init__(self, url: str, prefix: str, interval_s: float = 0.05):
        from supportsim.contract.redis_keys import RedisKeys

        self.client = redis.Redis.from_url(url)
        self.keys = RedisKeys(prefix)
        self.interval_s = interval_s
        self.samples_ms: list[float] = []
        self.seen_at_ms: list[float] = []  # when each sample became visible (epoch ms)
        self._seen: dict[tuple[str, bytes], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-watcher", daemon=True)

    def _poll(self, record: bool) -> None:
        now = time.time() * 1000
        rows = [("a", r) for r in self.client.zrange(self.keys.active, 0, -1, withscores=True)]
        recent = self.client.zrangebyscore(self.keys.ended, now - 120_000, "+inf", withscores=True)
        rows += [("e", r) for r in recent]
        for kind, (member, score) in rows:
            if self._seen.get((kind, member)) != score:
                self._seen[(kind, member)] = score
                if record:
                    self.samples_ms.append(now - score)
                    self.seen_at_ms.append(now)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(redis.RedisError):
                self._poll(record=True)
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        """Note what is visible now (not sampled), then sample every change."""
        self._poll(record=False)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        self._thread.join(5)


def service_cpu(stack: Stack) -> dict[str, float]:
    """CPU seconds (user + system) used so far per service, replicas added up."""
    out: dict[str, float] = {}
    for label, pid in process_table(stack).items():
        name = label.rsplit("-", 1)[0]
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            out[name] = out.get(name, 0.0) + times.user + times.system
    return out


def service_rss(stack: Stack) -> dict[str, float]:
    """Resident memory (MB) per service, replicas added up, from the PIDs in processes.json."""
    out: dict[str, float] = {}
    for label, pid in process_table(stack).items():
        name = label.rsplit("-", 1)[0]
        with contextlib.suppress(psutil.Error):
            out[name] = out.get(name, 0.0) + psutil.Process(pid).memory_info().rss / 2**20
    return out
