"""Names of the Redis keys the aggregator writes and the dashboard reads (README: Redis keys)."""

from __future__ import annotations

from dataclasses import dataclass


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
