"""The two bot services and the conversation starter, wired onto Kafka with Quix Streams."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from supportsim.bots.conversation import (
    BotConfig,
    ConversationState,
    Opening,
    Responder,
    handle,
    opening_message,
)
from supportsim.bots.llm import FatalSetupError
from supportsim.contract.messages import ChatMessage, Role, to_json
from supportsim.contract.protocol import slot_id
from supportsim.kafka.app import make_app
from supportsim.kafka.dead_letters import validated, write_dead_letter
from supportsim.kafka.producers import close_producer
from supportsim.kafka.topics import Topics
from supportsim.logs import configure_logging
from supportsim.settings import ServiceSettings

logger = logging.getLogger(__name__)
STATE_KEY = "conversation"


class BotSettings(ServiceSettings):
    """Settings of ai_customer, ai_support_agent and conversation_starter."""

    bot_mode: Literal["llm", "scripted"] = Field(
        "llm", description="llm (the model of LLM_BACKEND) or scripted (templates, no model)."
    )
    scenario: str = Field(
        "electronics",
        description="Scenario: a folder under prompts/ (persona lists, prompts, greetings) or a"
        " path.",
    )
    max_turns: int = Field(12, description="Turns after which a conversation ends.")
    conversations: int = Field(
        4, description="Concurrent conversations to keep going (seeded per chat partition)."
    )
    seed_namespace: str = Field(
        "supportsim",
        description="Namespace of the deterministic conversation ids the starter seeds.",
    )
    scripted_think_time_s: float = Field(0.0, description="Pause (s) before a scripted reply.")
    scripted_goodbye_after: int = Field(
        6, description="Turns after which a scripted bot says goodbye."
    )
    # as the aggregator's: a conversation's state is forgotten this long after its last message
    conversation_retention_s: int = Field(
        86_400,
        ge=1,
        description="Seconds a conversation's state outlives its last message (as"
        " redis_aggregator's).",
    )


def build_responder(settings: BotSettings, opening: Opening) -> Responder:
    """The LLM (loaded once per process) or the scripted templates."""
    if settings.bot_mode == "scripted":
        from supportsim.bots.scripted import ScriptedResponder

        return ScriptedResponder(settings.scripted_think_time_s, settings.scripted_goodbye_after)
    from supportsim.bots.turns import LLMResponder

    return LLMResponder.from_env(opening, progress=_log_assembly())


def _log_assembly():
    """A progress callback that logs a model file's assembly at every tenth of the way."""
    shown = [-1]

    def progress(done: int, total: int) -> None:
        tenth = done * 10 // total if total else 10
        if tenth != shown[0]:
            shown[0] = tenth
            logger.info("assembling the model: %d%% of %.0f MB", tenth * 10, total / 1e6)

    return progress


def load_opening(settings: BotSettings):
    """The scenario: prompts, persona lists and greetings."""
    from supportsim.bots.prompts import Scenario

    return Scenario.load(settings.scenario)


def run_bot(role: Role) -> None:
    """Run one bot replica until SIGTERM: read `chat`, answer the other side, write `chat`.

    With ``LLM_CONCURRENCY`` above 1 the replica runs that many worker processes, each its own
    consumer of the group (so each turn is still answered once, exactly once), and keeps as many
    turns in flight, e.g. against a batching model server.
    """
    service = "ai_customer" if role == "customer" else "ai_support_agent"
    settings = BotSettings(service_name=service)
    configure_logging(settings.log_level, service)
    group = service.replace("_", "-")
    workers = _concurrency(settings)
    if workers > 1:
        raise SystemExit(supervise_workers(role, settings, group, workers))
    app, topics = make_app(settings, group=group)
    opening = load_opening(settings)
    try:
        responder = build_responder(settings, opening)
    except FatalSetupError as exc:
        logger.error("%s", exc)
        raise SystemExit(2) from None
    config = BotConfig(role=role, max_turns=settings.max_turns, service=service)
    logger.info("%s bot ready: model=%s scenario=%s", role, responder.model_name, settings.scenario)

    retention = timedelta(seconds=settings.conversation_retention_s)
    step = conversation_step(config, responder, opening, topics, retention)
    validated(app.dataframe(topics.chat), ChatMessage, topics, service).apply(
        step, stateful=True, expand=True
    ).to_topic(topics.chat, key=lambda m: m["conversation_id"].encode())
    app.run()


def conversation_step(
    config: BotConfig,
    responder: Responder,
    opening: Opening,
    topics: Topics,
    retention: timedelta,
):
    """The bot's stateful step: one `chat` message in, the replies to write out.

    A conversation's state expires `retention` after its last message (in event time, as the
    aggregator's), so ended and abandoned conversations do not stay in state for ever.
    """

    def step(value: dict, state: Any) -> list[dict]:
        stored = state.get(STATE_KEY)
        current = ConversationState.from_state(stored) if stored else None
        message = ChatMessage.model_validate(value)
        outcome = handle(current, message, config, responder, opening)
        if outcome.state is not None:
            state.set(STATE_KEY, outcome.state.to_state(), ttl=retention)
        for letter in outcome.dead_letters:
            write_dead_letter(topics, letter, message.key)
        return [to_json(m) for m in outcome.messages]

    return step


def seed_conversations(settings: BotSettings | None = None) -> list[str]:
    """Start the target number of conversations (idempotent: re-seeding repeats the same ids)."""
    settings = settings or BotSettings(service_name="conversation_starter")
    app, topics = make_app(settings, group="conversation-starter", exactly_once=False)
    opening = load_opening(settings)
    ids = [slot_id(settings.seed_namespace, slot) for slot in range(settings.conversations)]
    producer = app.get_producer()
    try:
        for conversation_id in ids:
            message = opening_message(conversation_id, opening)
            producer.produce(
                topics.chat.name, key=message.key, value=message.model_dump_json().encode()
            )
    finally:
        if left := close_producer(producer):
            raise RuntimeError(f"{left} opening message(s) not delivered to {topics.chat.name}")
    logger.info("seeded %s conversation(s) on %s", len(ids), topics.chat.name)
    return ids


def _concurrency(settings: BotSettings) -> int:
    if settings.bot_mode != "llm":
        return 1
    from supportsim.bots.llm import LLMConfig

    return LLMConfig().concurrency


def supervise_workers(role: Role, settings: BotSettings, group: str, workers: int) -> int:
    """Run `workers` bot processes of this replica until SIGTERM; return the exit status.

    Each worker has its own transactional id and state folder. When one dies the others are
    stopped and its status returned, so the orchestrator restarts the whole replica.
    """
    base_id = settings.transactional_id_for(group)
    command = [
        sys.executable,
        "-c",
        f"from supportsim.bots.runner import run_bot; run_bot({role!r})",
    ]
    procs = []
    for index in range(workers):
        env = {
            **os.environ,
            "LLM_CONCURRENCY": "1",
            "TRANSACTIONAL_ID": f"{base_id}-w{index}",
            "STATE_DIR": str(Path(settings.state_dir) / f"worker-{index}"),
        }
        procs.append(subprocess.Popen(command, env=env))
    logger.info("%s replica running %d workers (%s-w0..%d)", role, workers, base_id, workers - 1)
    stopping = []

    def stop(signum: int, frame: object) -> None:
        stopping.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    while not status:
        running = [proc for proc in procs if proc.poll() is None]
        dead = [proc for proc in procs if proc.poll() not in (None, 0)]
        # every worker may have died between two polls: a dead one always fails the replica
        if dead and not stopping:
            status = dead[0].returncode
            logger.error("a %s worker exited with status %s; stopping the replica", role, status)
            stop(signal.SIGTERM, None)
        elif not running:
            break
        else:
            time.sleep(0.5)
    for proc in procs:
        proc.wait()
    return status
