"""History: every scored message written to InfluxDB 3 by Quix Streams' built-in InfluxDB3Sink.

One point per message in the measurement `INFLUXDB_MEASUREMENT` (default `chat_messages`), at the
message's `timestamp_ms`:

- tags: `conversation_id`, `role`, `customer_mood`, `product`, `agent_name`;
- fields: `text`, `sentiment_label`, `sentiment_score`, `sentiment_model`, `turn`, `message_id`,
  `customer_name`, `model`, `prompt_tokens`, `completion_tokens`, `latency_ms`, `final` and,
  on a final message, `end_reason`.

Line protocol cannot carry a raw newline in any value, so `text` is stored with backslash,
newline and carriage return written as `\\\\`, `\\n` and `\\r` (:func:`decode_text` reverses it),
and tag values, which are identifiers, have control characters replaced by spaces and
backslashes by `/`. InfluxDB keeps one point per measurement, tag set and time, so writing a
message twice (after a restart) changes nothing: the sink runs at-least-once.

An InfluxDB that answers 5xx or cannot be reached is backpressure, not a crash: the application
pauses, keeps its offsets, and retries the same messages with a capped exponential backoff.
The InfluxDB client is imported only when the sink is built, so `influx_configured` works
without the `influx` extra installed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from typing import Any

from pydantic import Field, SecretStr
from quixstreams import Application
from quixstreams.models import HeadersTuples
from quixstreams.sinks.base import BaseSink, SinkBackpressureError

from supportsim.contract.messages import ScoredMessage
from supportsim.kafka.app import make_app
from supportsim.kafka.dead_letters import validated
from supportsim.settings import ServiceSettings

logger = logging.getLogger(__name__)

REQUIRED_VARIABLES = ("INFLUXDB_HOST", "INFLUXDB_DATABASE", "INFLUXDB_TOKEN")
TAG_KEYS = ("conversation_id", "role", "customer_mood", "product", "agent_name")
FIELD_KEYS = (
    "text",
    "sentiment_label",
    "sentiment_score",
    "sentiment_model",
    "turn",
    "message_id",
    "customer_name",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "final",
    "end_reason",
)
_TEXT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r"}
_TEXT_UNESCAPES = {"\\\\": "\\", "\\n": "\n", "\\r": "\r"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class HistorySettings(ServiceSettings):
    """Settings of the InfluxDB sink. The token is a secret: never logged, no default."""

    service_name: str = "influx_sink"
    influxdb_host: str | None = Field(
        None,
        description="InfluxDB 3 URL, e.g. https://<region>.aws.cloud2.influxdata.com; the sink"
        " runs only when host, database and token are set.",
    )
    influxdb_database: str | None = Field(
        None, description="InfluxDB database (created on the first write)."
    )
    influxdb_token: SecretStr | None = Field(
        None, description="InfluxDB token with write access to the database: a secret."
    )
    influxdb_org: str = Field(
        "", description="Organisation: InfluxDB 3 ignores it, the client requires one."
    )
    influxdb_measurement: str = Field(
        "chat_messages", description="Measurement the scored messages are written to."
    )
    influxdb_batch_size: int = Field(1000, ge=1, description="Points written per request.")
    influxdb_timeout_ms: int = Field(
        10_000, ge=100, description="Time limit (ms) of one write request."
    )
    influxdb_retry_max_s: float = Field(
        30.0, gt=0, description="Longest pause (s) between retries while InfluxDB fails."
    )
    influxdb_verify_ssl: bool = Field(
        True, description="Verify the TLS certificate of the InfluxDB server."
    )


def influx_configured(env: dict[str, str]) -> str | None:
    """Why the sink cannot run with this environment, or None when it can.

    `env` is what a service gets on top of this process's environment (`supportsim up` passes
    its service environment through `ServiceSpec.enabled`).
    """
    merged = {**os.environ, **env}
    missing = [name for name in REQUIRED_VARIABLES if not merged.get(name)]
    if missing:
        return f"InfluxDB is not configured (set {', '.join(missing)})"
    if importlib.util.find_spec("influxdb_client_3") is None:
        return "the InfluxDB client is not installed (pip install -e '.[influx]')"
    return None


def encode_text(text: str) -> str:
    """Message text as stored in InfluxDB: backslash, newline and CR escaped, reversibly."""
    return "".join(_TEXT_ESCAPES.get(char, char) for char in text)


def decode_text(stored: str) -> str:
    """The original text of a stored `text` field (the inverse of :func:`encode_text`)."""
    return re.sub(r"\\[\\nr]", lambda m: _TEXT_UNESCAPES[m.group(0)], stored)


def tag_value(value: str) -> str:
    """A tag value line protocol carries unambiguously: no control characters, no backslash."""
    return _CONTROL.sub(" ", value).replace("\\", "/")


def history_point(message: dict) -> dict:
    """The flat record the sink writes for one scored message (a `ScoredMessage` as a dict).

    Raises ValueError for a time InfluxDB cannot take at millisecond precision, so the message
    goes to the dead-letter topic instead of failing the whole batch.
    """
    timestamp = message["timestamp_ms"]
    if not 10**12 <= timestamp < 10**13:
        raise ValueError(f"timestamp_ms {timestamp} is not an epoch time in milliseconds")
    sentiment = message["sentiment"]
    point: dict[str, Any] = {
        "conversation_id": tag_value(message["conversation_id"]),
        "role": tag_value(message["role"]),
        "customer_mood": tag_value(message["customer"]["mood"]),
        "product": tag_value(message["customer"]["product"]),
        "agent_name": tag_value(message["agent"]["name"]),
        "text": encode_text(message["text"]),
        "sentiment_label": sentiment["label"],
        "sentiment_score": float(sentiment["score"]),
        "sentiment_model": sentiment["model"],
        "turn": message["turn"],
        "message_id": message["message_id"],
        "customer_name": message["customer"]["name"],
        "model": message["model"],
        "prompt_tokens": message["prompt_tokens"],
        "completion_tokens": message["completion_tokens"],
        "latency_ms": message["latency_ms"],
        "final": bool(message.get("final")),
        "timestamp_ms": timestamp,
    }
    if message.get("end_reason") is not None:
        point["end_reason"] = message["end_reason"]
    return point


class HistorySink(BaseSink):
    """Quix Streams' InfluxDB3Sink, with an unavailable InfluxDB turned into backpressure.

    The built-in sink writes synchronously without retrying, and any error but a 429 would stop
    the application. Here a 5xx answer or a connection failure makes the application pause and
    process the same messages again after a capped exponential backoff; other errors (a bad
    token, a rejected point) still stop it, with the server's message.
    """

    def __init__(self, settings: HistorySettings) -> None:
        super().__init__()
        from influxdb_client_3 import InfluxDBError
        from quixstreams.sinks.core.influxdb3 import InfluxDB3Sink
        from urllib3.exceptions import HTTPError

        token = settings.influxdb_token
        if not (settings.influxdb_host and settings.influxdb_database and token):
            raise ValueError(influx_configured({}) or "InfluxDB is not configured")
        self._server_error = InfluxDBError
        self._unreachable = (HTTPError, OSError)
        self._retry_max_s = settings.influxdb_retry_max_s
        self._failures = 0
        self.influx = InfluxDB3Sink(
            token=token.get_secret_value(),
            host=settings.influxdb_host,
            organization_id=settings.influxdb_org,
            database=settings.influxdb_database,
            measurement=settings.influxdb_measurement,
            fields_keys=FIELD_KEYS,
            tags_keys=TAG_KEYS,
            time_setter="timestamp_ms",
            time_precision="ms",
            allow_missing_fields=True,
            batch_size=settings.influxdb_batch_size,
            request_timeout_ms=settings.influxdb_timeout_ms,
            verify_ssl=settings.influxdb_verify_ssl,
            on_client_connect_success=lambda: logger.info(
                "InfluxDB at %s answers", settings.influxdb_host
            ),
            on_client_connect_failure=self._connect_failed,
        )

    def __repr__(self) -> str:
        return "<HistorySink: InfluxDB3Sink with retries>"

    def _connect_failed(self, exc: Exception | None) -> None:
        """At start, an unreachable InfluxDB is waited for (writes retry); a refusal is fatal."""
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is not None and 400 <= status < 500:
            raise RuntimeError(f"InfluxDB refused the connection check: HTTP {status}") from exc
        logger.warning("InfluxDB is not reachable yet (%s); writes will retry", exc)

    def start(self) -> None:
        """Set up the InfluxDB client (through the built-in sink's connection check)."""
        self.influx.start()

    def add(
        self,
        value: Any,
        key: Any,
        timestamp: int,
        headers: HeadersTuples,
        topic: str,
        partition: int,
        offset: int,
    ) -> None:
        """Batch a point (see :func:`history_point`)."""
        self.influx.add(value, key, timestamp, headers, topic, partition, offset)

    def retry_after(self) -> float:
        """Seconds to wait after the current run of failures: 1, 2, 4, ... capped."""
        return min(self._retry_max_s, 2.0 ** (self._failures - 1))

    def flush(self) -> None:
        """Write the batched points; an unavailable InfluxDB asks the application to retry."""
        try:
            self.influx.flush()
        except self._server_error as exc:
            status = getattr(exc.response, "status", None) if exc.response is not None else None
            if status is not None and status < 500:
                raise
            self._back_off(f"HTTP {status}")
        except self._unreachable as exc:
            self._back_off(type(exc).__name__)
        else:
            if self._failures:
                logger.info("InfluxDB is back after %d failed attempts", self._failures)
                self._failures = 0

    def _back_off(self, why: str) -> None:
        self._failures += 1
        delay = self.retry_after()
        logger.warning(
            "InfluxDB unavailable (%s); attempt %d failed, retrying in %.0f s from the last "
            "committed offsets, nothing is lost",
            why,
            self._failures,
            delay,
        )
        raise SinkBackpressureError(retry_after=delay)

    def on_paused(self) -> None:
        """Drop the batches of a paused checkpoint (they are processed again)."""
        self.influx.on_paused()


def build_history(settings: HistorySettings) -> Application:
    """The InfluxDB sink application: scored messages in, points out (call `.run()`).

    At-least-once: a point written twice is the same point, so transactions would buy nothing.
    """
    app, topics = make_app(settings, group="influx-sink", exactly_once=False)
    messages = validated(app.dataframe(topics.scored), ScoredMessage, topics, settings.service_name)
    messages.apply(history_point).sink(HistorySink(settings))
    return app
