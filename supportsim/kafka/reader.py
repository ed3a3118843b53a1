"""One bounded topic reader: every partition from its start (or a time) to a well-defined end.

The product (`supportsim export`, `supportsim compare`, the progress counts of `supportsim up`)
and the tests read topics through :class:`TopicReader`. It assigns partitions (no consumer group
is joined, no offset is committed), caps the client's prefetch so a long topic does not fill
memory, and is a context manager that closes its consumer.

Where reading ends (measured on Tansu 0.6.0, the embedded broker; the same rule holds on Kafka)
-------------------------------------------------------------------------------------------

Partition `p` ends at `E_p`, the end of its log when reading began:

1. the high watermark that the broker answers to an offset query (ListOffsets) before reading;
2. raised, once, to the high watermark that the client caches from the first fetch response that
   brings anything (a record or the end of the partition) from `p`.

Tansu answers ListOffsets with the base offset of the partition's last record batch plus one,
not with the end of the log: short by all but one record of the last batch (250 records written
in one batch: it answered 1), and 0 to read_committed readers while a transaction is open on the
partition. The high watermark in a fetch response is right. On Kafka the first answer is right
and step 2 adds what was written meanwhile. Raising once keeps the read bounded however fast the
topic grows.

A partition is done at the first of:

- a record at or past `E_p` (not yielded: it was written after reading began), or the reader's
  position reaching `E_p` (transaction markers move the position without yielding anything);
- the client's partition EOF: the broker's readable end when the reader got there. For
  read_uncommitted that is a high watermark seen after reading began, and becomes `E_p` (the
  cached watermark of step 2 may be from a later fetch than the one that reached the end). For
  read_committed it is the last stable offset: the reader stops before the records of a
  transaction still open instead of waiting on it (Kafka aborts such a transaction only after
  `transaction.timeout.ms`, Tansu never), and :attr:`TopicRead.held_back` counts the offsets
  left.

An empty partition ends at its first fetch. A read that makes no progress at all (no record, no
EOF, no position moved) for `stall_timeout` seconds gives up on the partitions left and lists them
in :attr:`TopicRead.stalled`.

Start: the beginning, or with `since_ms` the first offset whose Kafka timestamp is at or after it
(Kafka's offsets-for-times; Tansu answers 0 whatever the time, so there the read starts at the
beginning); either way records stamped earlier than `since_ms` are skipped, so both brokers yield
the same.

Counting: :meth:`TopicReader.end_offsets` and :func:`count` answer the offset query alone (one
round trip): exact on Kafka, on Tansu short by up to one batch per partition, enough to see that
something was written. With `exact=True` they also take the high watermark from one fetch per
partition: exact on both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    TIMESTAMP_NOT_AVAILABLE,
    KafkaError,
    TopicPartition,
)

from supportsim.settings import KafkaSettings, ServiceSettings

logger = logging.getLogger(__name__)

# librdkafka prefetches up to 64 MB per consumer by default: cap it, or a long topic fills memory
BOUNDED_FETCH = {
    "queued.min.messages": 1000,
    "queued.max.messages.kbytes": 1024,
    "max.partition.fetch.bytes": 256 * 1024,
    "fetch.max.bytes": 1024 * 1024,
}
# Tansu holds every fetch for the full wait even when it has data, and a partition that
# transactions touch holds thousands of commit markers (the dead letters' partition: 3,000
# offsets for 44 records): at 500 ms a fetch a reader never reached its end
FETCH_WAIT_MAX_MS = 10
Isolation = Literal["read_committed", "read_uncommitted"]


class TopicReadError(RuntimeError):
    """A topic could not be read: it does not exist, or the client failed for good."""


class TopicMissing(TopicReadError):
    """The topic does not exist on the broker."""


@dataclass(frozen=True)
class Record:
    """One Kafka record as read."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None  # the Kafka timestamp; None where the broker has none


class TopicReader:
    """A consumer for bounded reads of topics; use it as a context manager (it closes the consumer).

    `settings` gives the consumer group's prefix (`CONSUMER_GROUP_PREFIX`) and, unless `kafka` is
    given, the connection (`KAFKA_*`, Quix Cloud's token included); `isolation` overrides the
    connection's `isolation.level`. No group is joined: the group id only names the client.
    """

    def __init__(
        self,
        settings: ServiceSettings | None = None,
        *,
        kafka: KafkaSettings | None = None,
        isolation: Isolation | None = None,
        purpose: str = "reader",
    ):
        settings = settings or ServiceSettings()
        self.kafka = kafka or settings.kafka
        self.isolation = isolation or self.kafka.isolation_level
        self.group = settings.group(f"supportsim-{purpose}")
        self._app: Any = None
        self._consumer: Any = None

    def __enter__(self) -> TopicReader:
        from quixstreams import Application

        from supportsim.kafka.app import connection

        self._app = Application(
            broker_address=connection(self.kafka),
            consumer_group=self.group,
            auto_offset_reset="earliest",
            consumer_extra_config={
                "isolation.level": self.isolation,
                "fetch.wait.max.ms": FETCH_WAIT_MAX_MS,
                "enable.partition.eof": True,
                **BOUNDED_FETCH,
            },
            loglevel=None,
        )
        self._consumer = self._app.get_consumer(auto_commit_enable=False)
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the consumer (idempotent)."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close()

    @property
    def consumer(self):
        """The open consumer (Quix Streams' wrapper of confluent-kafka's)."""
        if self._consumer is None:
            raise TopicReadError("the reader is not open: use it as `with TopicReader(...)`")
        return self._consumer

    def resolve(self, name: str) -> str:
        """The broker-side name of a topic (Quix Cloud prefixes names with the workspace id)."""
        self.consumer  # noqa: B018 (raises when not open)
        if self._app.is_quix_app:
            return self._app.topic(name, value_deserializer="bytes", key_deserializer="bytes").name
        return name

    def partitions(self, topic: str) -> list[int]:
        """The partitions of a broker-side topic name; TopicMissing when there is no such topic."""
        info = self.consumer.list_topics(topic, timeout=15).topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            raise TopicMissing(f"topic {topic!r} does not exist on the broker")
        return sorted(info.partitions)

    def end_offsets(
        self, name: str, *, exact: bool = False, timeout: float = 10.0
    ) -> dict[int, int]:
        """Per partition, the end of its log (its high watermark); see the module docstring.

        Without `exact`, the broker's answer to an offset query: exact on Kafka (for
        read_committed: the last stable offset), short by up to a batch on Tansu. With `exact`,
        raised to the high watermark of one fetch per partition (the partition's last records
        are fetched, not yielded). TopicMissing when the topic does not exist.
        """
        topic = self.resolve(name)
        consumer = self.consumer
        ends = {p: self._listed_end(topic, p) for p in self.partitions(topic)}
        if not exact:
            return ends
        consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in ends])
        try:
            seen: set[int] = set()
            deadline = time.monotonic() + timeout
            while len(seen) < len(ends) and time.monotonic() < deadline:
                for message in consumer.consume(500, 0.2):
                    error = message.error()
                    if error is None or error.code() == KafkaError._PARTITION_EOF:
                        seen.add(message.partition())
            for p in seen:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), cached=True)
                ends[p] = max(ends[p], high)
        finally:
            consumer.unassign()
        return ends

    def read(
        self,
        name: str,
        *,
        since_ms: int | None = None,
        stall_timeout: float = 30.0,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> TopicRead:
        """A bounded read of topic `name`: iterate it (once) for its records; see the module doc.

        `on_progress(done, total)` is called after each batch with offsets passed and offsets to
        read. Iterating raises TopicMissing when the topic does not exist.
        """
        return TopicRead(self, self.resolve(name), since_ms, stall_timeout, on_progress)

    def _listed_end(self, topic: str, partition: int) -> int:
        _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=15)
        return max(0, high)


class TopicRead:
    """One bounded read of a topic. Iterating yields records in offset order within a partition
    (in no particular order across partitions); afterwards the attributes say what was read:
    `starts` and `ends` (`E_p`) per partition, `stopped` (where reading of each stopped), `read`
    (records yielded), `stalled` (partitions given up after `stall_timeout`)."""

    def __init__(
        self,
        reader: TopicReader,
        topic: str,
        since_ms: int | None,
        stall_timeout: float,
        on_progress: Callable[[int, int], None] | None,
    ):
        self.reader = reader
        self.topic = topic
        self.since_ms = since_ms
        self.stall_timeout = stall_timeout
        self.on_progress = on_progress
        self.starts: dict[int, int] = {}
        self.ends: dict[int, int] = {}
        self.stopped: dict[int, int] = {}
        self.stalled: list[int] = []
        self.read = 0
        self._iterated = False

    @property
    def total(self) -> int:
        """Offsets to read across partitions (markers included: an upper bound of records)."""
        return sum(max(0, self.ends[p] - self.starts[p]) for p in self.ends)

    @property
    def done(self) -> int:
        """Offsets passed so far across partitions."""
        return sum(
            max(0, min(self.stopped[p], self.ends[p]) - self.starts[p]) for p in self.stopped
        )

    @property
    def held_back(self) -> dict[int, int]:
        """Per partition that stopped short of its end: the offsets not read (behind a
        transaction still open, for read_committed, or after a stall)."""
        short = {p: self.ends[p] - self.stopped[p] for p in self.ends}
        return {p: n for p, n in sorted(short.items()) if n > 0}

    def offsets(self) -> dict[str, list[int]]:
        """Per partition: [first offset, offset where reading stopped] of what was read."""
        return {
            str(p): [self.starts[p], min(self.stopped[p], self.ends[p])] for p in sorted(self.ends)
        }

    def _start(self, partitions: list[int]) -> list[TopicPartition]:
        """Fill starts and ends; the assignment that begins the read."""
        consumer, topic = self.reader.consumer, self.topic
        assignment = []
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
            self.starts[p], self.ends[p] = max(low, 0), max(high, 0)
            assignment.append(TopicPartition(topic, p, OFFSET_BEGINNING))
        if self.since_ms is not None:
            wanted = [TopicPartition(topic, p, max(0, self.since_ms)) for p in partitions]
            for found in consumer.offsets_for_times(wanted, timeout=15):
                if found.error is not None:
                    continue  # read from the beginning; the timestamps filter
                at = assignment[partitions.index(found.partition)]
                if found.offset >= 0:
                    at.offset = found.offset
                    self.starts[found.partition] = max(self.starts[found.partition], found.offset)
                elif found.offset == OFFSET_END:  # nothing stamped at or after since_ms
                    at.offset = OFFSET_END
                    self.starts[found.partition] = self.ends[found.partition]
        self.stopped = dict(self.starts)
        return assignment

    def __iter__(self) -> Iterator[Record]:
        if self._iterated:
            raise TopicReadError("a TopicRead is read once; ask the reader for another")
        self._iterated = True
        consumer, topic = self.reader.consumer, self.topic
        partitions = self.reader.partitions(topic)
        consumer.assign(self._start(partitions))
        pending, raised = set(partitions), set()
        since = self.since_ms
        uncommitted = self.reader.isolation == "read_uncommitted"

        def finish(p: int) -> None:
            pending.discard(p)
            consumer.pause([TopicPartition(topic, p)])

        def raise_end(p: int) -> None:  # step 2 of the end rule, once per partition
            if p not in raised:
                raised.add(p)
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), cached=True)
                self.ends[p] = max(self.ends[p], high)

        last_progress = time.monotonic()
        try:
            while pending:
                batch = consumer.consume(500, 0.2)
                progressed = bool(batch)
                for message in batch:
                    p = message.partition()
                    if p not in pending or message.topic() != topic:
                        continue
                    raise_end(p)
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            self.stopped[p] = max(self.stopped[p], message.offset())
                            if uncommitted:  # a high watermark, seen after reading began
                                self.ends[p] = self.stopped[p]
                            finish(p)  # the readable end: nothing more to read now
                        elif error.fatal():
                            raise TopicReadError(f"reading {topic}: {error}")
                        else:
                            logger.warning("reading %s: %s", topic, error)
                        continue
                    offset = message.offset()
                    if offset >= self.ends[p]:
                        finish(p)  # written after reading began
                        continue
                    self.stopped[p] = max(self.stopped[p], offset + 1)
                    kind, stamp = message.timestamp()
                    has_stamp = kind != TIMESTAMP_NOT_AVAILABLE and stamp >= 0
                    if since is None or not has_stamp or stamp >= since:
                        self.read += 1
                        yield Record(
                            p, offset, message.key(), message.value(), stamp if has_stamp else None
                        )
                    if self.stopped[p] >= self.ends[p]:
                        finish(p)
                if not batch and pending:
                    progressed = self._check_positions(pending, raise_end, finish)
                now = time.monotonic()
                if progressed:
                    last_progress = now
                elif pending and now - last_progress > self.stall_timeout:
                    self.stalled = sorted(pending)
                    logger.warning(
                        "%s: partitions %s stopped at %s short of their ends %s: nothing new in "
                        "%.0f s (an open transaction?)",
                        topic,
                        self.stalled,
                        [self.stopped[p] for p in self.stalled],
                        [self.ends[p] for p in self.stalled],
                        self.stall_timeout,
                    )
                    return
                if self.on_progress is not None:
                    self.on_progress(self.done, self.total)
        finally:
            if self.reader._consumer is consumer:  # not closed under a dropped iteration
                consumer.unassign()
            if self.on_progress is not None:
                self.on_progress(self.done, max(self.done, self.total))

    def _check_positions(self, pending: set[int], raise_end, finish) -> bool:
        """Positions moved by transaction markers alone: True when any moved."""
        moved = False
        tps = [TopicPartition(self.topic, p) for p in sorted(pending)]
        for tp in self.reader.consumer.position(tps):
            p = tp.partition
            if tp.offset > self.stopped[p]:
                moved = True
                raise_end(p)
                self.stopped[p] = tp.offset
                if tp.offset >= self.ends[p]:
                    finish(p)
        return moved


def count(
    topics: list[str],
    settings: ServiceSettings | None = None,
    *,
    kafka: KafkaSettings | None = None,
    exact: bool = False,
) -> dict[str, int]:
    """Offsets used in each topic (sum of its partitions' ends, read_uncommitted; markers
    included), 0 for a topic that does not exist; see `end_offsets` for `exact`."""
    counts = {}
    with TopicReader(settings, kafka=kafka, isolation="read_uncommitted", purpose="count") as r:
        for name in topics:
            try:
                counts[name] = sum(r.end_offsets(name, exact=exact).values())
            except TopicMissing:
                counts[name] = 0
    return counts
