"""Run the whole pipeline locally for a harness: start, supervise, stop, read its fleet."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from supportsim.contract.messages import (
    new_id,
)
from supportsim.contract.protocol import slot_id
from supportsim.contract.redis_keys import clear_prefix
from supportsim.local.stack import SERVICES, ServiceSpec, Stack

Say = Callable[[str], None]

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
    with redis.Redis.from_url(url) as client:
        return clear_prefix(client, prefix)


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
