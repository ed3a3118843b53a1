"""The dashboard's reads from Redis: settings and consistent snapshots.

Every value is read into its model of :mod:`supportsim.contract.live_view`, which is tolerant of
missing fields and odd values; a value that is not a JSON object at all is counted as unreadable.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import redis
from pydantic import Field
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from supportsim.contract.live_view import (
    DEFAULT_BUCKET_MS,
    Conversation,
    Fleet,
    Pipeline,
    read,
    read_series,
)
from supportsim.contract.messages import now_ms
from supportsim.contract.redis_keys import RedisKeys
from supportsim.live.frames import conversation_frame, series_frame, summarize
from supportsim.settings import RedisSettings

MGET_CHUNK = 500  # keys per MGET; all chunks go in one pipelined round trip


class DashboardSettings(RedisSettings):
    """Dashboard configuration from the environment (`DASHBOARD_REFRESH_S`, ...)."""

    dashboard_refresh_s: float = Field(
        2.0, ge=0, description="Seconds between live refreshes (0: off)."
    )
    dashboard_max_ended: int = Field(
        1000, ge=0, description="Finished conversations listed, newest first."
    )
    dashboard_port: int | None = Field(
        None, ge=1, le=65535, description="Port under `supportsim up`; unset: a free one."
    )
    dashboard_address: str = Field(
        "127.0.0.1", description="Address the dashboard listens on under `supportsim up`."
    )
    dashboard_wall_size: int = Field(
        4, ge=0, le=12, description="Conversations on the live wall (0 hides it)."
    )
    dashboard_wall_linger_s: float = Field(
        30.0,
        ge=0,
        description="Seconds (of message time) an ended conversation stays on the wall before it"
        " is replaced.",
    )


@dataclass
class Snapshot:
    """Everything one dashboard render needs, read in a handful of round trips."""

    conversations: pd.DataFrame
    fleet: Fleet  # empty (`messages` None) when the key is missing or malformed
    series: pd.DataFrame
    active_total: int
    ended_total: int
    unreadable: int  # listed conversations whose document is not valid JSON
    taken_ms: int
    pipeline: Pipeline = field(default_factory=Pipeline)  # the `pipeline` key (chat counts)

    @property
    def empty(self) -> bool:
        """True when nothing has been aggregated yet."""
        return (
            self.conversations.empty
            and self.active_total == 0
            and self.ended_total == 0
            and self.fleet.started == 0
            and not self.fleet.messages
        )

    @property
    def bucket_ms(self) -> int:
        """The series' bucket size as the aggregator wrote it; 10 s when it does not say."""
        return self.pipeline.series_bucket_ms or self.fleet.series_bucket_ms or DEFAULT_BUCKET_MS


@dataclass
class _Cached:
    version: tuple[str, float]
    row: dict[str, Any]


@dataclass
class DashboardStore:
    """Reads the aggregator's keys from one Redis under one prefix.

    Keeps the table rows between reads: a conversation's score in its set (updated_ms while
    active, ended_ms once ended) is its version, so a refresh fetches only new and changed
    conversations, with pipelined MGETs in chunks. Safe to share between sessions.
    """

    client: redis.Redis
    keys: RedisKeys
    max_ended: int = 1000
    chunk: int = MGET_CHUNK
    _rows: dict[str, _Cached] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_settings(cls, settings: DashboardSettings) -> DashboardStore:
        """A store for the configured Redis and prefix."""
        client = redis.Redis.from_url(
            settings.redis_url.get_secret_value(),
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=3,
            health_check_interval=30,
            # one quick retry: when Redis is down the page says so at once and retries next refresh
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        )
        return cls(client, RedisKeys(settings.redis_key_prefix), settings.dashboard_max_ended)

    def conversation(self, conversation_id: str) -> Conversation | None:
        """One conversation's document, or None when missing or malformed."""
        return read(Conversation, self.client.get(self.keys.conversation(conversation_id)))

    def conversations(self, conversation_ids: Sequence[str]) -> dict[str, Conversation]:
        """Documents of several conversations by id, in one round trip (missing ones left out)."""
        with _collection_paused():
            return {
                cid: document
                for cid, document in self._fetch(list(conversation_ids))
                if document is not None
            }

    def snapshot(self) -> Snapshot:
        """Fleet, series and every listed conversation's row (active first, newest first)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zrevrange(self.keys.active, 0, -1, withscores=True)
        if self.max_ended:
            pipe.zrevrange(self.keys.ended, 0, self.max_ended - 1, withscores=True)
        pipe.zcard(self.keys.ended)
        pipe.get(self.keys.fleet)
        pipe.get(self.keys.series)
        pipe.get(self.keys.pipeline)
        replies = pipe.execute(raise_on_error=False)
        active, *rest = replies
        ended = rest.pop(0) if self.max_ended else []
        ended_total, fleet_raw, series_raw, pipeline_raw = rest
        pipeline = read(Pipeline, _text(pipeline_raw)) or Pipeline()
        listed: dict[str, tuple[str, float]] = {}
        for status, members in (("active", active), ("ended", ended)):
            if isinstance(members, list):
                for member, score in members:
                    listed[member] = (status, score)  # ended wins over a stale active entry
        rows, missing, unreadable = self._rows_for(listed)
        missing_ended = sum(1 for cid in missing if listed[cid][0] == "ended")
        return Snapshot(
            conversations=conversation_frame(rows),
            fleet=read(Fleet, _text(fleet_raw)) or Fleet(),
            series=series_frame(read_series(_text(series_raw)), pipeline),
            active_total=sum(
                1
                for cid, (status, _) in listed.items()
                if status == "active" and cid not in missing
            ),
            ended_total=(ended_total if isinstance(ended_total, int) else len(ended))
            - missing_ended,
            unreadable=unreadable,
            taken_ms=now_ms(),
            pipeline=pipeline,
        )

    def _rows_for(self, listed: dict[str, tuple[str, float]]) -> tuple[list[dict], set[str], int]:
        """Rows of the listed conversations, newest first; also the ids whose document is
        gone (expired between the aggregator's trims) and how many are malformed."""
        with self._lock:
            for gone in self._rows.keys() - listed.keys():
                del self._rows[gone]
            stale = [
                cid
                for cid, version in listed.items()
                if (cached := self._rows.get(cid)) is None or cached.version != version
            ]
            fresh: dict[str, dict[str, Any]] = {}
            malformed: set[str] = set()
            # each document becomes its row at once: only the rows outlive the loop
            with _collection_paused():
                for cid, document in self._fetch(stale):
                    if document is None:
                        malformed.add(cid)
                        continue
                    version = listed[cid]
                    row = summarize(document, version[0])
                    row["conversation_id"] = cid
                    if _consistent(document, version):
                        self._rows[cid] = _Cached(version, row)
                    fresh[cid] = row
            missing = set(stale) - fresh.keys() - malformed
            rows_by_id: dict[str, dict[str, Any]] = {}
            for cid in listed:
                if cid in fresh:
                    rows_by_id[cid] = fresh[cid]
                elif cid in self._rows and cid not in stale:
                    rows_by_id[cid] = self._rows[cid].row
        order = sorted(
            rows_by_id,
            key=lambda cid: (listed[cid][0] != "active", -listed[cid][1]),
        )
        return [rows_by_id[cid] for cid in order], missing, len(malformed)

    def _fetch(self, conversation_ids: list[str]) -> Iterator[tuple[str, Conversation | None]]:
        """(id, document) for each id whose key holds a string value, read with pipelined MGETs
        in chunks; the document is None when the value is not a JSON object (malformed)."""
        if not conversation_ids:
            return
        pipe = self.client.pipeline(transaction=False)
        for start in range(0, len(conversation_ids), self.chunk):
            chunk = conversation_ids[start : start + self.chunk]
            pipe.mget([self.keys.conversation(cid) for cid in chunk])
        replies = pipe.execute()
        for start, values in zip(range(0, len(conversation_ids), self.chunk), replies, strict=True):
            for cid, raw in zip(conversation_ids[start : start + self.chunk], values, strict=True):
                if raw is not None:  # None: expired, or not a string: nothing to show
                    yield cid, read(Conversation, raw)


@contextmanager
def _collection_paused() -> Iterator[None]:
    """Hold the cyclic garbage collector back while documents are parsed.

    Reading a thousand documents creates tens of thousands of small models, none of them in a
    cycle and most freed at once; the collections their allocations would trigger (each one
    walking the objects of the process) tripled the time of a cold read. The collector runs as
    usual afterwards.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _text(reply: Any) -> str | None:
    """A GET reply when it is a string (not missing, not an error such as WRONGTYPE)."""
    return reply if isinstance(reply, str) else None


def _consistent(document: Conversation, version: tuple[str, float]) -> bool:
    # the aggregator may update the set and the document in two steps: cache a row only when
    # the document has caught up with its set entry, else read it again next time
    status, score = version
    if status == "ended":
        return document.status == "ended"
    updated = document.updated_ms
    return updated is not None and updated >= score
