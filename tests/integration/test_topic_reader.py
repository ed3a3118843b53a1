"""The bounded topic reader (supportsim.kafka.reader) against the real broker (Tansu).

Tansu answers offset queries with the base offset of a partition's last batch plus one, so the
records here are produced in batches of many, the case where that answer falls short.
"""

from __future__ import annotations

import gc
import os
import threading
import time

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from supportsim.contract.messages import new_id
from supportsim.kafka.reader import Record, TopicMissing, TopicReader, TopicReadError, count
from supportsim.settings import KafkaSettings
from tests.harness.readback import read_records

PARTITIONS = 4


def make_topic(broker: str, name: str, partitions: int = PARTITIONS) -> str:
    """A topic with explicit retention (Tansu reports none otherwise)."""
    admin = AdminClient({"bootstrap.servers": broker})
    config = {"retention.ms": "3600000", "retention.bytes": "1073741824"}
    for future in admin.create_topics([NewTopic(name, partitions, 1, config=config)]).values():
        future.result(30)
    return name


def produce(broker: str, topic: str, count_: int, *, tag: str = "r", timestamp=None) -> set:
    """`count_` records keyed over 40 keys (so every partition gets some), in large batches;
    returns the set of (key, value) pairs written."""
    producer = Producer({"bootstrap.servers": broker, "linger.ms": 20})
    written = set()
    for i in range(count_):
        key, value = f"k{i % 40}".encode(), f"{tag}-{i}-{new_id()}".encode()
        extra = {} if timestamp is None else {"timestamp": timestamp}
        producer.produce(topic, key=key, value=value, **extra)
        written.add((key, value))
    assert producer.flush(30) == 0
    return written


def reader(broker: str, isolation: str = "read_uncommitted") -> TopicReader:
    return TopicReader(kafka=KafkaSettings(broker_address=broker), isolation=isolation)


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_reads_exactly_what_was_produced_across_partitions(broker, prefix):
    topic = make_topic(broker, f"{prefix}exact")
    written = produce(broker, topic, 3000)
    # committed transactions leave markers: offsets that hold no record
    txn = Producer({"bootstrap.servers": broker, "transactional.id": f"{prefix}txn"})
    txn.init_transactions()
    for _ in range(3):
        txn.begin_transaction()
        for i in range(20):
            value = f"t-{i}-{new_id()}".encode()
            txn.produce(topic, key=f"k{i}".encode(), value=value)
            written.add((f"k{i}".encode(), value))
        txn.commit_transaction()
    with reader(broker) as r:
        listed = r.end_offsets(topic)
        exact = r.end_offsets(topic, exact=True)
        reading = r.read(topic, stall_timeout=10)
        records = list(reading)
    assert {(rec.key, rec.value) for rec in records} == written
    assert len(records) == len(written) == reading.read
    assert {rec.partition for rec in records} == set(range(PARTITIONS))
    for p in range(PARTITIONS):
        offsets = [rec.offset for rec in records if rec.partition == p]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert all(isinstance(rec.timestamp_ms, int) for rec in records)
    assert reading.stalled == [] and reading.held_back == {}
    assert exact == reading.ends, "the exact ends are where the read ended"
    assert sum(exact.values()) == len(written) + 3 * PARTITIONS  # one commit marker each
    assert all(listed[p] <= exact[p] for p in exact), "the offset query never overshoots"
    assert count([topic, f"{prefix}absent"], kafka=KafkaSettings(broker_address=broker)) == {
        topic: sum(listed.values()),
        f"{prefix}absent": 0,
    }


def test_stops_at_its_end_while_a_producer_keeps_writing(broker, prefix):
    topic = make_topic(broker, f"{prefix}live")
    before = produce(broker, topic, 2000, tag="before")
    stop = threading.Event()
    written_during = [0]

    def keep_writing():  # ~5,000 records/s at most: more would load the shared broker
        producer = Producer({"bootstrap.servers": broker, "linger.ms": 5})
        while not stop.is_set():
            for i in range(50):
                producer.produce(topic, key=f"k{i % 40}".encode(), value=b"during")
            producer.flush(10)
            written_during[0] += 50
            time.sleep(0.01)

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        with reader(broker) as r:
            reading = r.read(topic, stall_timeout=10)
            records = []
            for record in reading:
                records.append(record)
                time.sleep(0.001)  # slower than the writer: an unbounded reader never ends
        seconds = time.monotonic() - started
        during_at_end = written_during[0]
    finally:
        stop.set()
        writer.join(10)
    got = {(rec.key, rec.value) for rec in records}
    assert before <= got, "everything written before the read began is read"
    assert reading.stalled == [] and reading.held_back == {}
    later = sum(rec.value == b"during" for rec in records)
    print(
        f"\nread {len(records)} records in {seconds:.1f} s: {later} of the {during_at_end} "
        "written during it"
    )
    assert later < during_at_end, "the read ended before the writer did"
    assert seconds < 60


def test_an_empty_topic_ends_at_once_and_a_missing_one_says_so(broker, prefix):
    topic = make_topic(broker, f"{prefix}empty")
    with reader(broker) as r:
        started = time.monotonic()
        reading = r.read(topic, stall_timeout=30)
        assert list(reading) == []
        assert time.monotonic() - started < 5
        assert reading.stalled == [] and reading.total == 0
        assert r.end_offsets(topic, exact=True) == dict.fromkeys(range(PARTITIONS), 0)
        with pytest.raises(TopicMissing, match="does not exist"):
            list(r.read(f"{prefix}no-such-topic"))
    assert read_records(broker, f"{prefix}no-such-topic") == []


def test_since_starts_at_a_time_and_skips_earlier_records(broker, prefix):
    topic = make_topic(broker, f"{prefix}since")
    old = produce(broker, topic, 500, tag="old", timestamp=1_000_000)
    new = produce(broker, topic, 500, tag="new", timestamp=2_000_000)
    later = produce(broker, topic, 500, tag="later", timestamp=3_000_000)
    with reader(broker) as r:
        records = list(r.read(topic, since_ms=2_000_000))
    got = {(rec.key, rec.value) for rec in records}
    assert got == new | later and not got & old
    assert {rec.timestamp_ms for rec in records} == {2_000_000, 3_000_000}


def test_read_committed_stops_before_an_open_transaction_without_waiting(broker, prefix):
    topic = make_topic(broker, f"{prefix}open", partitions=1)
    committed = produce(broker, topic, 30)
    txn = Producer({"bootstrap.servers": broker, "transactional.id": f"{prefix}open"})
    txn.init_transactions()
    txn.begin_transaction()
    for i in range(7):
        txn.produce(topic, key=b"k", value=f"open-{i}".encode())
    txn.flush(10)
    try:
        with reader(broker, "read_committed") as r:
            started = time.monotonic()
            reading = r.read(topic, stall_timeout=30)
            records = list(reading)
            seconds = time.monotonic() - started
        assert {(rec.key, rec.value) for rec in records} == committed
        assert seconds < 10 and reading.stalled == []
        assert reading.held_back == {0: 7}
        assert len(read_records(broker, topic, isolation="read_uncommitted")) == 37
    finally:
        txn.abort_transaction(10)


def test_the_consumer_is_closed_however_reading_ends(broker, prefix):
    topic = make_topic(broker, f"{prefix}closed")
    produce(broker, topic, 200)
    with reader(broker) as r:  # warm: the client library's own threads
        list(r.read(topic))
    gc.collect()
    gc.disable()  # closed at once, not by a later collection
    try:
        before = threads()
        for _ in range(3):
            with reader(broker) as r:
                assert len(list(r.read(topic))) == 200
            with reader(broker) as r:
                for _record in r.read(topic):
                    break  # left early
            with pytest.raises(TopicMissing), reader(broker) as r:
                list(r.read(f"{prefix}absent"))
            assert len(read_records(broker, topic)) == 200
            count([topic], kafka=KafkaSettings(broker_address=broker), exact=True)
        assert threads() <= before
    finally:
        gc.enable()
    with pytest.raises(TopicReadError, match="not open"):
        r.consumer  # noqa: B018 (closed)


def test_harness_read_records_keeps_its_record_type(broker, prefix):
    topic = make_topic(broker, f"{prefix}harness", partitions=2)
    written = produce(broker, topic, 100)
    records = read_records(broker, topic)
    assert all(isinstance(rec, Record) for rec in records)
    assert [(rec.partition, rec.offset) for rec in records] == sorted(
        (rec.partition, rec.offset) for rec in records
    )
    assert {(rec.key, rec.value) for rec in records} == written
