"""The message contract: one typed model per topic, shared by every service.

Producers build these models; consumers validate raw Kafka values with :func:`parse_chat` or
:func:`parse_scored`, which never raise: a bad value comes back as a :class:`DeadLetter` carrying
the reason, ready for the dead-letter topic.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationError,
    model_serializer,
)

MAX_TEXT_CHARS = 4000
MAX_RAW_VALUE_CHARS = 64_000  # dead letters keep the start of a huge value, never the whole MB
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"

Uuid = Annotated[str, StringConstraints(pattern=UUID_PATTERN)]
ShortText = Annotated[str, StringConstraints(max_length=200)]
Role = Literal["customer", "agent"]
SentimentLabel = Literal["positive", "neutral", "negative"]
Outcome = Literal["resolved", "unresolved", "gave_up"]
# optional fields left out, not null, when unset: a message without them passes through unchanged
OPTIONAL_FIELDS = ("evaluated_prompt_tokens", "card", "policy", "outcome", "remedy")


def now_ms() -> int:
    """Current UTC time in epoch milliseconds."""
    return int(time.time() * 1000)


def new_id() -> str:
    """A fresh uuid4 string, used for conversation and message ids."""
    return str(uuid.uuid4())


class _Contract(BaseModel):
    # strict: "3" is not a turn and 1 is not a name; extra fields pass through untouched
    model_config = ConfigDict(strict=True, extra="allow", frozen=False)


class CustomerPersona(_Contract):
    """Who the customer is in one conversation."""

    name: ShortText
    mood: ShortText
    product: ShortText


class AgentPersona(_Contract):
    """Who the support agent is in one conversation."""

    name: ShortText


class ScenarioCard(_Contract):
    """The customer's scenario card: facts it reveals when asked, what it wants and refuses.

    Hidden from the agent: never in the agent's prompt or an agent-side training line.
    """

    scenario: ShortText
    id: ShortText
    product: ShortText
    facts: dict[ShortText, ShortText]
    wants: ShortText
    refuses: ShortText
    patience: int = Field(ge=1, le=1000)
    # the remedies that give the customer what it wants
    accepts: list[ShortText] = Field(default_factory=list)


class ChatMessage(_Contract):
    """One chat turn on the `chat` topic. The Kafka key is `conversation_id`."""

    conversation_id: Uuid
    message_id: Uuid
    turn: int = Field(ge=0, le=100_000)
    role: Role
    text: str = Field(max_length=MAX_TEXT_CHARS)
    timestamp_ms: int = Field(ge=0)
    customer: CustomerPersona
    agent: AgentPersona
    model: ShortText
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    # prompt tokens the model read this turn; the rest of prompt_tokens was reused (None: unknown)
    evaluated_prompt_tokens: int | None = Field(default=None, ge=0)
    latency_ms: int = Field(ge=0)
    final: bool = False
    end_reason: ShortText | None = None
    # the customer's scenario card and the agent's policy for this conversation (when drawn)
    card: ScenarioCard | None = None
    policy: dict[ShortText, ShortText] | None = None
    # on a final message: how the conversation ended for the customer
    outcome: Outcome | None = None
    # on an agent message: the remedy it offered (one of the scenario's remedies)
    remedy: ShortText | None = None

    @property
    def key(self) -> bytes:
        """The Kafka key of this message."""
        return self.conversation_id.encode()

    @model_serializer(mode="wrap")
    def _without_unknown_counts(self, handler: SerializerFunctionWrapHandler) -> dict:
        # an unknown count stays absent, so a message without it passes through services unchanged
        data = handler(self)
        for name in OPTIONAL_FIELDS:
            if name in data and data[name] is None:
                del data[name]
        return data


class Sentiment(_Contract):
    """Sentiment of one message: `score` = P(positive) - P(negative), in [-1, 1]."""

    label: SentimentLabel
    score: float = Field(ge=-1.0, le=1.0)
    model: ShortText


class ScoredMessage(ChatMessage):
    """A chat turn with its sentiment, on the `chat-scored` topic."""

    sentiment: Sentiment


class DeadLetter(BaseModel):
    """A value no service could use, with where it came from and why."""

    source_topic: str
    partition: int | None = None
    offset: int | None = None
    key: str | None = None
    value: str
    value_encoding: Literal["utf-8", "base64"] = "utf-8"
    error: str
    service: str
    timestamp_ms: int = Field(default_factory=now_ms)


M = TypeVar("M", bound=ChatMessage)


def _as_text(raw: bytes | None) -> tuple[str, Literal["utf-8", "base64"]]:
    if raw is None:
        return "", "utf-8"
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "value"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def dead_letter(
    raw: bytes | None,
    error: str,
    *,
    service: str,
    source_topic: str,
    partition: int | None = None,
    offset: int | None = None,
    key: bytes | None = None,
) -> DeadLetter:
    """Build a dead-letter record for a raw Kafka value that could not be used."""
    value, encoding = _as_text(raw[:MAX_RAW_VALUE_CHARS] if raw else raw)
    key_text = _as_text(key)[0] if key is not None else None
    return DeadLetter(
        source_topic=source_topic,
        partition=partition,
        offset=offset,
        key=key_text,
        value=value,
        value_encoding=encoding,
        error=error,
        service=service,
    )


def parse(
    model: type[M],
    raw: bytes | None,
    *,
    service: str,
    source_topic: str,
    partition: int | None = None,
    offset: int | None = None,
    key: bytes | None = None,
) -> M | DeadLetter:
    """Validate a raw Kafka value as `model`; return the message or a dead letter. Never raises."""

    def reject(reason: str) -> DeadLetter:
        return dead_letter(
            raw,
            reason,
            service=service,
            source_topic=source_topic,
            partition=partition,
            offset=offset,
            key=key,
        )

    if raw is None:
        return reject("empty value (tombstone)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return reject(f"value is not valid UTF-8: {exc}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return reject(f"value is not JSON: {exc}")
    if not isinstance(data, dict):
        return reject(f"value is JSON {type(data).__name__}, expected an object")
    try:
        message = model.model_validate(data)
    except ValidationError as exc:
        return reject(f"invalid {model.__name__}: {_describe(exc)}")
    if key is not None and key != message.key:
        return reject(f"key {key!r} does not match conversation_id {message.conversation_id!r}")
    return message


def parse_chat(raw: bytes | None, **where) -> ChatMessage | DeadLetter:
    """Validate a value from the `chat` topic."""
    return parse(ChatMessage, raw, **where)


def parse_scored(raw: bytes | None, **where) -> ScoredMessage | DeadLetter:
    """Validate a value from the `chat-scored` topic."""
    return parse(ScoredMessage, raw, **where)


def to_json(message: BaseModel) -> dict:
    """The JSON-ready dict of a contract model (what goes on the wire)."""
    return message.model_dump(mode="json")
