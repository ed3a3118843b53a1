"""Configuration from environment variables only, with defaults that run locally.

Each service has one settings class (a subclass of :class:`ServiceSettings`); a field named
`chat_topic` is read from `CHAT_TOPIC`, and so on. Secrets are `SecretStr` and never logged.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

QUIX_TOKEN_VARIABLE = "Quix__Sdk__Token"  # noqa: S105 (the variable name, not a value)
# Quix Cloud injects this per replica (quix-docs: deploy/quix-variables.md); the deployment's own
# variables are the same for every replica, so they cannot name one
QUIX_REPLICA_VARIABLE = "Quix__Deployment__ReplicaName"


class KafkaSettings(BaseSettings):
    """How to reach the broker: a plain address, SASL/TLS options, or Quix Cloud's token."""

    model_config = SettingsConfigDict(env_prefix="KAFKA_", extra="ignore")

    broker_address: str = Field(
        "localhost:9092",
        description="Bootstrap servers, host:port[,host:port] (Quix Cloud connects by its token).",
    )
    security_protocol: Literal["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"] | None = Field(
        None, description="plaintext, ssl, sasl_plaintext or sasl_ssl; unset: plaintext."
    )
    sasl_mechanism: str | None = Field(None, description="SASL mechanism, e.g. SCRAM-SHA-512.")
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password: a secret, from the environment only, never logged."
    )
    ssl_ca_location: str | None = Field(None, description="CA certificate file for TLS.")
    session_timeout_ms: int = Field(45_000, description="Consumer session timeout (ms).")
    # an LLM turn may take minutes on a slow CPU; the poll loop must not be evicted meanwhile
    max_poll_interval_ms: int = Field(
        900_000,
        description="Longest time (ms) between polls before the consumer leaves its group;"
        " an LLM turn must fit.",
    )
    replication_factor: int = Field(
        1, description="Replication factor of the topics this service creates."
    )
    transactional: bool = Field(
        True,
        description="Exactly-once processing with Kafka transactions"
        " (false for brokers without transactions).",
    )
    # Tansu holds every fetch for the full wait: keep it short so live messages flow at once
    fetch_wait_max_ms: int = Field(100, description="Longest wait (ms) of a fetch for new data.")
    # read_committed on Kafka. On Tansu, which gives read_committed readers nothing while any
    # transaction is open on a partition (and shows aborted records anyway), `supportsim up` reads
    # uncommitted: every consumer keeps the first copy of a message_id, so nothing counts twice.
    isolation_level: Literal["read_committed", "read_uncommitted"] = Field(
        "read_committed",
        description="What consumers read: read_committed (Kafka, Quix Cloud) or read_uncommitted"
        " (Tansu); see README.md.",
    )

    @property
    def on_quix_cloud(self) -> bool:
        """True when Quix Cloud's token is in the environment (Quix Streams then connects)."""
        return bool(os.environ.get(QUIX_TOKEN_VARIABLE))


class ServiceSettings(BaseSettings):
    """Settings every service shares: topics, consumer group, state folder, logging."""

    model_config = SettingsConfigDict(extra="ignore")

    service_name: str = Field(
        "supportsim", description="Name of this service in logs and dead letters."
    )
    chat_topic: str = Field("chat", description="Topic of chat turns (key = conversation_id).")
    scored_topic: str = Field(
        "chat-scored", description="Topic of chat turns with their sentiment."
    )
    dead_letter_topic: str = Field(
        "chat-dead-letters",
        description="Topic that receives every message that could not be processed, with the"
        " reason.",
    )
    chat_partitions: int = Field(
        4, description="Partitions of the chat topic when this service creates it."
    )
    scored_partitions: int = Field(
        4, description="Partitions of the scored topic when this service creates it."
    )
    dead_letter_partitions: int = Field(
        1, description="Partitions of the dead-letter topic when this service creates it."
    )
    topic_retention_ms: int = Field(
        7 * 24 * 3600 * 1000, description="Retention (ms) of the topics this service creates."
    )
    topic_retention_bytes: int = Field(
        1024**3,
        description="Retention (bytes per partition) of the topics this service creates.",
    )
    consumer_group: str | None = Field(
        None,
        description="Consumer group; unset: the service's own default (a new group replays"
        " from the start).",
    )
    consumer_group_prefix: str = Field("", description="Prefix put in front of the consumer group.")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a new consumer group starts: earliest or latest."
    )
    state_dir: str = Field("state", description="State folder of Quix Streams (RocksDB).")
    commit_interval: float = Field(1.0, description="Seconds between commits (and transactions).")
    log_level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING or ERROR.")
    # per process, never a deployment variable: replicas that share a transactional.id fence
    # each other (see transactional_id_for)
    replica_index: int | None = Field(
        None, description="This replica's number, set per process by `supportsim up`."
    )
    transactional_id: str | None = Field(
        None, description="This process's producer transactional.id, set per worker process."
    )

    @property
    def kafka(self) -> KafkaSettings:
        """Broker connection settings (read from the `KAFKA_*` variables)."""
        return KafkaSettings()

    def transactional_id_for(self, group: str) -> str:
        """A producer `transactional.id` that stays the same when this replica restarts.

        The restarted replica then fences its crashed predecessor at once. With a new random id
        per process, a transaction left open by a crash holds back every read_committed reader
        of its partitions until the broker times it out, and Tansu never does. In order:
        `TRANSACTIONAL_ID` (set per worker process by the bots' worker supervisor),
        `REPLICA_INDEX` (set per replica by `supportsim up`), Quix Cloud's per-replica name,
        else host name and process id (unique, if not stable).
        """
        if self.transactional_id:
            return self.transactional_id
        if self.replica_index is not None:
            return f"{group}-{self.replica_index}"
        if replica_name := os.environ.get(QUIX_REPLICA_VARIABLE):
            return f"{group}-{replica_name}"
        return f"{group}-{socket.gethostname()}-{os.getpid()}"

    def group(self, default: str) -> str:
        """The consumer group: `CONSUMER_GROUP` if set, else the service's own default.

        `CONSUMER_GROUP_PREFIX` is put in front of either (tests use it for isolation).
        """
        return self.consumer_group_prefix + (self.consumer_group or default)


class RedisSettings(BaseSettings):
    """Where Redis is. Credentials belong in the URL, which is read from the environment."""

    model_config = SettingsConfigDict(extra="ignore")

    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis URL; credentials go in the URL, so it is a secret (never logged).",
    )
    redis_key_prefix: str = Field("supportsim:", description="Prefix of every Redis key.")


BUILTIN_SENTIMENT_MODEL = "builtin"


def is_builtin_sentiment_model(reference: str) -> bool:
    """True when a `SENTIMENT_MODEL` value names the builtin model (empty counts as builtin).

    Here, not in `supportsim.sentiment.model`, so that `supportsim up` can tell without importing
    torch.
    """
    return reference.strip() in ("", BUILTIN_SENTIMENT_MODEL)
