"""The Redis documents of the live view as typed models: the one definition of their layout.

The redis_aggregator writes them (:mod:`supportsim.sinks.live_view`), the dashboard reads them
(:mod:`supportsim.live`), the dashboard's sample data builds them and the chaos oracle checks
Redis with them; docs/redis-keys.md describes every field. One model per document:

- :class:`Conversation`: `P conversation:{id}`, with its :class:`SentimentPoint` list, its
  per-role :class:`RoleTotals` and its :class:`RecentMessage` list;
- :class:`Fleet`: `P fleet`, with its :class:`FleetGroup` per mood and product and its
  :class:`FleetRole` per role;
- :class:`SeriesPoint`: one bucket of `P series:sentiment` (a JSON list of them);
- :class:`Pipeline`: `P pipeline`, with its :class:`PipelinePoint` list.

Reading is tolerant, because a page must not break on one odd value: a document written by an
older aggregator (fields missing), or a key edited by hand (wrong types). Every field has a
default, and a value of the wrong type falls back to it instead of failing (pydantic-core's
`on_error="default"`, so validation stays in Rust and costs about as much as parsing the JSON);
a malformed entry of a list is left out. Numbers are strict (a string or a bool is not a count,
NaN is not a score); text takes a number as its decimal text. A field whose absence means
something to readers is optional (`None`: the writer did not have it). Unknown fields are
ignored, so a newer aggregator's additions do not disturb an older reader.

Writing goes through the same models: :func:`written` validates a value and dumps back exactly
the fields it has, and :func:`encode` turns it into the bytes stored (sorted keys, so equal
values are equal bytes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    Strict,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import CoreSchema, core_schema

DEFAULT_BUCKET_MS = 10_000  # series bucket size when a document does not say (SERIES_BUCKET_S)


class OrDefault:
    """Marks a type whose invalid values become `default` (or `factory()`) instead of an error."""

    __slots__ = ("default", "factory")

    def __init__(self, default: Any = None, *, factory: Callable[[], Any] | None = None) -> None:
        self.default = default
        self.factory = factory

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        schema = handler(source)
        if self.factory is not None:
            return core_schema.with_default_schema(
                schema, default_factory=self.factory, on_error="default"
            )
        return core_schema.with_default_schema(schema, default=self.default, on_error="default")


class Omitted:
    """Marks the item type of a list whose invalid items are left out instead of an error."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.with_default_schema(handler(source), on_error="omit")


_T = TypeVar("_T")

# field types: each falls back to its default on a value of the wrong type
Count = Annotated[int, Strict(), OrDefault(0)]
OptionalInt = Annotated[Annotated[int, Strict()] | None, OrDefault(None)]
Turn = Annotated[int, Strict(), OrDefault(-1)]  # -1: unknown
Millis = Annotated[Annotated[int, Strict()] | None, OrDefault(None)]  # epoch milliseconds
Score = Annotated[Annotated[float, Strict(), AllowInfNan(False)] | None, OrDefault(None)]
Text = Annotated[str, OrDefault("")]
OptionalText = Annotated[str | None, OrDefault(None)]
Label = Annotated[Literal["positive", "neutral", "negative"] | None, OrDefault(None)]
Status = Annotated[Literal["active", "ended"], OrDefault("active")]
BucketSize = Annotated[Annotated[int, Strict(), Field(gt=0)] | None, OrDefault(None)]
Items = Annotated[list[Annotated[_T, Omitted()]], OrDefault(factory=list)]  # bad items left out


class Document(BaseModel):
    """Base of the Redis documents: tolerant reading, unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)


# --------------------------------------------------------------------------- conversation


class Customer(Document):
    """The customer's persona (fields beyond these pass through, as in the chat message)."""

    model_config = ConfigDict(extra="allow")

    name: Text = ""
    mood: Text = ""
    product: Text = ""


class Agent(Document):
    """The support agent's persona."""

    model_config = ConfigDict(extra="allow")

    name: Text = ""


class SentimentPoint(Document):
    """One message's sentiment in a conversation's `sentiments`."""

    turn: Turn = -1
    role: Text = ""
    label: Label = None  # None: not one of positive, neutral, negative
    score: Score = None


class RoleTotals(Document):
    """One role's totals in a conversation's `roles`."""

    messages: Count = 0
    sentiment_avg: Score = None
    sentiment_first: Score = None
    sentiment_last: Score = None
    sentiment_sum_micro: Count = 0


class RecentMessage(Document):
    """One of a conversation's `recent` messages; `remedy` only on an agent's offer."""

    message_id: Text = ""
    turn: Turn = -1
    role: Text = ""
    text: Text = ""
    label: Label = None
    score: Score = None
    timestamp_ms: Millis = None
    remedy: OptionalText = None


class Conversation(Document):
    """`P conversation:{conversation_id}`: one conversation (docs/redis-keys.md)."""

    conversation_id: Text = ""
    customer: Annotated[Customer, OrDefault(factory=Customer)] = Field(default_factory=Customer)
    agent: Annotated[Agent, OrDefault(factory=Agent)] = Field(default_factory=Agent)
    # the scenario card as the bots wrote it: free-form (`id`, `scenario`, `wants`, ...)
    card: Annotated[dict[str, Any] | None, OrDefault(None)] = None
    model: Text = ""
    models: Annotated[dict[str, Text], OrDefault(factory=dict)] = Field(default_factory=dict)
    status: Status = "active"
    end_reason: OptionalText = None
    outcome: OptionalText = None
    remedy: OptionalText = None
    messages: Count = 0
    last_turn: OptionalInt = None
    missing_turns: Count = 0
    sentiment_avg: Score = None
    sentiment_last: Score = None
    sentiments: Items[SentimentPoint] = Field(default_factory=list)
    roles: Annotated[
        dict[str, Annotated[RoleTotals, OrDefault(factory=RoleTotals)]], OrDefault(factory=dict)
    ] = Field(default_factory=dict)
    recent: Items[RecentMessage] = Field(default_factory=list)
    started_ms: Millis = None
    updated_ms: Millis = None
    ended_ms: Millis = None
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    latency_ms_avg: Score = None
    sentiment_sum_micro: Count = 0
    latency_ms_total: Count = 0


# --------------------------------------------------------------------------- fleet


class FleetGroup(Document):
    """The totals of one customer mood or product in `by_mood` / `by_product`."""

    conversations: Count = 0
    active: Count = 0
    messages: Count = 0
    sentiment_avg: Score = None
    # None: an aggregator that did not split customer messages out (then use the above)
    customer_messages: OptionalInt = None
    customer_sentiment_avg: Score = None


class FleetRole(Document):
    """One role's totals in the fleet's `roles`."""

    messages: Count = 0
    sentiment_avg: Score = None
    sentiment_now: Score = None
    sentiment_now_conversations: Count = 0


class Fleet(Document):
    """`P fleet`: totals over all conversations (docs/redis-keys.md)."""

    active: Count = 0
    ended: Count = 0
    started: Count = 0
    abandoned: Count = 0
    messages: OptionalInt = None  # None: no fleet figures at all
    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    sentiment_avg_active: Score = None
    sentiment_avg: Score = None
    latency_ms_avg: Score = None
    tokens_per_message: Score = None
    completion_tokens_per_message: Score = None
    end_reasons: Annotated[dict[str, Count], OrDefault(factory=dict)] = Field(default_factory=dict)
    by_mood: Annotated[
        dict[str, Annotated[FleetGroup, OrDefault(factory=FleetGroup)]], OrDefault(factory=dict)
    ] = Field(default_factory=dict)
    by_product: Annotated[
        dict[str, Annotated[FleetGroup, OrDefault(factory=FleetGroup)]], OrDefault(factory=dict)
    ] = Field(default_factory=dict)
    roles: Annotated[
        dict[str, Annotated[FleetRole, OrDefault(factory=FleetRole)]], OrDefault(factory=dict)
    ] = Field(default_factory=dict)
    updated_ms: Millis = None
    series_bucket_ms: BucketSize = None  # None: an older aggregator (DEFAULT_BUCKET_MS)


# --------------------------------------------------------------------------- series


class SeriesPoint(Document):
    """One bucket of `P series:sentiment`; an entry without a `bucket_ms` is left out."""

    bucket_ms: Annotated[int, Strict()]  # the start of the bucket
    messages: Count = 0
    sentiment_avg: Score = None
    completion_tokens: Count = 0
    customer_messages: Count = 0
    customer_sentiment_avg: Score = None
    agent_sentiment_avg: Score = None


SERIES = TypeAdapter(Items[SeriesPoint])  # `P series:sentiment`: a list, oldest first


# --------------------------------------------------------------------------- pipeline


class PipelinePoint(Document):
    """One bucket of the pipeline's `series`; an entry without a `bucket_ms` is left out."""

    bucket_ms: Annotated[int, Strict()]
    chat_messages: Count = 0
    chat_completion_tokens: Count = 0
    dead_letters: Count = 0


class Pipeline(Document):
    """`P pipeline`: chat and dead-letter counts, in total and per bucket (docs/redis-keys.md)."""

    chat_messages: Count = 0
    chat_newest_ms: Millis = None
    dead_letters: OptionalInt = None  # None: no dead-letter figures (an older aggregator)
    dead_letter_newest_ms: Millis = None
    series: Items[PipelinePoint] = Field(default_factory=list)
    series_bucket_ms: BucketSize = None  # None: an older aggregator (DEFAULT_BUCKET_MS)


# --------------------------------------------------------------------------- reading

_D = TypeVar("_D", bound=Document)


def read(model: type[_D], raw: str | bytes | None) -> _D | None:
    """A document from its Redis value; None when missing, not JSON or not a JSON object.

    Never raises on a value read from Redis: wrong field types fall back to their defaults.
    """
    if raw is None:
        return None
    try:
        return model.model_validate_json(raw)
    except ValidationError:
        return None


def read_series(raw: str | bytes | None) -> list[SeriesPoint]:
    """The `series:sentiment` buckets from its Redis value; empty when missing or malformed."""
    if raw is None:
        return []
    try:
        return SERIES.validate_json(raw)
    except ValidationError:
        return []


def series_points(value: Any) -> list[SeriesPoint]:
    """The `series:sentiment` buckets from decoded JSON (a list of dicts), tolerantly."""
    return SERIES.validate_python(value)


# --------------------------------------------------------------------------- writing


def written(model: type[Document], value: Mapping[str, Any] | Document) -> dict[str, Any]:
    """`value` validated by `model` and dumped as JSON data, with only the fields it has.

    What the aggregator writes: the layout of `model` decides every field, and a value that
    has exactly the model's fields comes back unchanged.
    """
    document = value if isinstance(value, model) else model.model_validate(value)
    return document.model_dump(mode="json", exclude_unset=True)


def written_series(points: Sequence[Mapping[str, Any] | SeriesPoint]) -> list[dict[str, Any]]:
    """`series:sentiment` buckets validated and dumped as :func:`written` does."""
    return SERIES.dump_python(SERIES.validate_python(points), mode="json", exclude_unset=True)


def encode(value: Any) -> bytes:
    """The JSON written to Redis (UTF-8): sorted keys, so equal values are equal bytes."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
