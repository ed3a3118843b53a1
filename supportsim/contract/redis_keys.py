"""Names of the Redis keys the aggregator writes and the dashboard reads (README: Redis keys)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

DELETE_CHUNK = 500  # keys per DEL command


class KeyClient(Protocol):
    """What `clear_prefix` needs of a Redis client (redis-py's `Redis` has it)."""

    def scan_iter(self, match: str, count: int) -> object: ...

    def delete(self, *names: object) -> object: ...


@dataclass(frozen=True)
class RedisKeys:
    """Names of the Redis keys, all under one prefix (docs/redis-keys.md)."""

    prefix: str = "supportsim:"

    def conversation(self, conversation_id: str) -> str:
        """The JSON value of one conversation."""
        return f"{self.prefix}conversation:{conversation_id}"

    @property
    def active(self) -> str:
        """Sorted set of active conversations, scored by last update (epoch ms)."""
        return f"{self.prefix}conversations:active"

    @property
    def ended(self) -> str:
        """Sorted set of ended conversations, scored by end time (epoch ms)."""
        return f"{self.prefix}conversations:ended"

    @property
    def fleet(self) -> str:
        """The JSON value of the fleet totals."""
        return f"{self.prefix}fleet"

    @property
    def series(self) -> str:
        """The JSON list of the sentiment time series."""
        return f"{self.prefix}series:sentiment"

    @property
    def pipeline(self) -> str:
        """The JSON value of the chat and dead-letter counts (how far scoring is behind)."""
        return f"{self.prefix}pipeline"


def keys_under(client: KeyClient, prefix: str, pattern: str = "*") -> list:
    """Every key under `prefix` that matches `pattern` (SCAN, never KEYS)."""
    return list(client.scan_iter(f"{prefix}{pattern}", count=1000))


def clear_prefix(client: KeyClient, prefix: str, keys: list | None = None) -> int:
    """Delete every key under `prefix` (or the given `keys`, found under it); return how many.

    The one place that deletes a prefix: only ever call it on a prefix this caller owns.
    """
    if not prefix:
        raise ValueError("refusing to clear an empty prefix: that is the whole database")
    keys = keys_under(client, prefix) if keys is None else keys
    for start in range(0, len(keys), DELETE_CHUNK):
        client.delete(*keys[start : start + DELETE_CHUNK])
    return len(keys)
