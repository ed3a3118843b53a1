"""The two bot services and the conversation starter, wired onto Kafka with Quix Streams."""

from __future__ import annotations

import logging
from typing import Literal

from supportsim.bots.conversation import (
    BotConfig,
    ConversationState,
    Opening,
    Responder,
    handle,
    opening_message,
    slot_id,
)
from supportsim.messages import ChatMessage, Role, to_json
from supportsim.service import configure_logging
from supportsim.settings import ServiceSettings
from supportsim.streaming import make_app, validated, write_dead_letter

logger = logging.getLogger(__name__)
STATE_KEY = "conversation"


class BotSettings(ServiceSettings):
    """Settings of ai_customer, ai_support_agent and conversation_starter."""

    bot_mode: Literal["llm", "scripted"] = "llm"
    scenario: str = "electronics"
    max_turns: int = 12
    conversations: int = 4
    seed_namespace: str = "supportsim"
    scripted_think_time_s: float = 0.0
    scripted_goodbye_after: int = 6


def build_responder(settings: BotSettings, opening: Opening) -> Responder:
    """The LLM (loaded once per process) or the scripted templates."""
    if settings.bot_mode == "scripted":
        from supportsim.bots.scripted import ScriptedResponder

        return ScriptedResponder(settings.scripted_think_time_s, settings.scripted_goodbye_after)
    from supportsim.bots.turns import LLMResponder

    return LLMResponder.from_env(opening, progress=logger.info)


def load_opening(settings: BotSettings):
    """The scenario: prompts, persona lists and greetings."""
    from supportsim.bots.prompts import Scenario

    return Scenario.load(settings.scenario)


def run_bot(role: Role) -> None:
    """Run one bot replica until SIGTERM: read `chat`, answer the other side, write `chat`."""
    service = "ai_customer" if role == "customer" else "ai_support_agent"
    settings = BotSettings(service_name=service)
    configure_logging(settings.log_level, service)
    app, topics = make_app(settings, group=service.replace("_", "-"))
    opening = load_opening(settings)
    responder = build_responder(settings, opening)
    config = BotConfig(role=role, max_turns=settings.max_turns, service=service)
    logger.info("%s bot ready: model=%s scenario=%s", role, responder.model_name, settings.scenario)

    def step(value: dict, state) -> list[dict]:
        stored = state.get(STATE_KEY)
        current = ConversationState.from_state(stored) if stored else None
        message = ChatMessage.model_validate(value)
        outcome = handle(current, message, config, responder, opening)
        if outcome.state is not None:
            state.set(STATE_KEY, outcome.state.to_state())
        for letter in outcome.dead_letters:
            write_dead_letter(topics, letter, message.key)
        return [to_json(m) for m in outcome.messages]

    validated(app.dataframe(topics.chat), ChatMessage, topics, service).apply(
        step, stateful=True, expand=True
    ).to_topic(topics.chat, key=lambda m: m["conversation_id"].encode())
    app.run()


def seed_conversations(settings: BotSettings | None = None) -> list[str]:
    """Start the target number of conversations (idempotent: re-seeding repeats the same ids)."""
    settings = settings or BotSettings(service_name="conversation_starter")
    app, topics = make_app(settings, group="conversation-starter", exactly_once=False)
    opening = load_opening(settings)
    ids = [slot_id(settings.seed_namespace, slot) for slot in range(settings.conversations)]
    with app.get_producer() as producer:
        for conversation_id in ids:
            message = opening_message(conversation_id, opening)
            producer.produce(
                topics.chat.name, key=message.key, value=message.model_dump_json().encode()
            )
    logger.info("seeded %s conversation(s) on %s", len(ids), topics.chat.name)
    return ids
