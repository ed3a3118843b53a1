"""Configuration from environment variables only, with defaults that run locally.

Each service has one settings class (a subclass of :class:`ServiceSettings`); a field named
`chat_topic` is read from `CHAT_TOPIC`, and so on. Secrets are `SecretStr` and never logged.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

QUIX_TOKEN_VARIABLE = "Quix__Sdk__Token"  # noqa: S105 (the variable name, not a value)
# Quix Cloud injects this per replica (quix-docs: deploy/quix-variables.md); the deployment's own
# variables are the same for every replica, so they cannot name one
QUIX_REPLICA_VARIABLE = "Quix__Deployment__ReplicaName"


class KafkaSettings(BaseSettings):
    """How to reach the broker: a plain address, SASL/TLS options, or Quix Cloud's token."""

    model_config = SettingsConfigDict(env_prefix="KAFKA_", extra="ignore")

    broker_address: str = "localhost:9092"
    security_protocol: Literal["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"] | None = None
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    session_timeout_ms: int = 45_000
    # an LLM turn may take minutes on a slow CPU; the poll loop must not be evicted meanwhile
    max_poll_interval_ms: int = 900_000
    replication_factor: int = 1
    transactional: bool = True
    # Tansu holds every fetch for the full wait: keep it short so live messages flow at once
    fetch_wait_max_ms: int = 100
    # read_committed on Kafka. On Tansu, which gives read_committed readers nothing while any
    # transaction is open on a partition (and shows aborted records anyway), `supportsim up` reads
    # uncommitted: every consumer keeps the first copy of a message_id, so nothing counts twice.
    isolation_level: Literal["read_committed", "read_uncommitted"] = "read_committed"

    @property
    def on_quix_cloud(self) -> bool:
        """True when Quix Cloud's token is in the environment (Quix Streams then connects)."""
        return bool(os.environ.get(QUIX_TOKEN_VARIABLE))


class ServiceSettings(BaseSettings):
    """Settings every service shares: topics, consumer group, state folder, logging."""

    model_config = SettingsConfigDict(extra="ignore")

    service_name: str = "supportsim"
    chat_topic: str = "chat"
    scored_topic: str = "chat-scored"
    dead_letter_topic: str = "chat-dead-letters"
    chat_partitions: int = 4
    scored_partitions: int = 4
    dead_letter_partitions: int = 1
    topic_retention_ms: int = 7 * 24 * 3600 * 1000
    topic_retention_bytes: int = 1024**3
    consumer_group: str | None = None
    consumer_group_prefix: str = ""
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    state_dir: str = "state"
    commit_interval: float = 1.0
    log_level: str = "INFO"
    # per process, never a deployment variable: replicas that share a transactional.id fence
    # each other (see transactional_id_for)
    replica_index: int | None = None
    transactional_id: str | None = None

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

    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    redis_key_prefix: str = "supportsim:"


BUILTIN_SENTIMENT_MODEL = "builtin"


def is_builtin_sentiment_model(reference: str) -> bool:
    """True when a `SENTIMENT_MODEL` value names the builtin model (empty counts as builtin).

    Here, not in `supportsim.sentiment.model`, so that `supportsim up` can tell without importing
    torch.
    """
    return reference.strip() in ("", BUILTIN_SENTIMENT_MODEL)
