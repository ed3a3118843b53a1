"""`BatchLoop` through the real broker when a transaction fails: nothing left open, nothing lost.

A retriable error (a commit that timed out, say) is injected into the real transactional
producer; the loop must end that transaction and process the batch again, and never seek a
partition that a rebalance took away meanwhile.
"""

import threading

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from supportsim.kafka import batch_loop as batching
from supportsim.kafka.app import make_app
from supportsim.kafka.batch_loop import BatchLoop, Output
from supportsim.settings import ServiceSettings
from tests.support import chat_message, produce_json, read_topic, values


class FailsOnce:
    """The real producer, except that its first `method` call fails with `error` first."""

    def __init__(self, producer, method: str, error: KafkaError):
        self._producer = producer
        self._method = method
        self._error = error
        self.failed = False

    def __getattr__(self, name):
        real = getattr(self._producer, name)
        if name != self._method or self.failed:
            return real

        def fail(*args, **kwargs):
            self.failed = True
            raise KafkaException(self._error)

        return fail


def forward(topic: str):
    return lambda records: [Output(topic, r.key(), r.value()) for r in records]


def test_a_retriable_commit_error_repeats_the_batch_and_leaves_no_transaction_open(
    service_env, broker, monkeypatch
):
    settings = ServiceSettings()
    app, topics = make_app(settings, group="batch-retriable")
    sent = [chat_message() for _ in range(6)]
    produce_json(broker, settings.chat_topic, sent)
    wrappers = []

    def flaky(app):
        error = KafkaError(KafkaError._TIMED_OUT, "commit timed out", retriable=True)
        wrappers.append(FailsOnce(real_producer(app), "commit_transaction", error))
        return wrappers[-1]

    real_producer = batching.transactional_producer
    monkeypatch.setattr(batching, "transactional_producer", flaky)
    loop = BatchLoop(app, topics.chat.name, forward(topics.scored.name), max_batch=4)
    watchdog = threading.Timer(60, loop.stop)
    watchdog.start()
    try:
        processed = loop.run(max_messages=len(sent))
    finally:
        watchdog.cancel()
    assert wrappers[0].failed
    assert processed == len(sent), "the loop stalled after the failed commit"
    got = values(read_topic(broker, settings.scored_topic, until=len(sent), timeout=20))
    assert {m["message_id"] for m in got} == {m["message_id"] for m in sent}


def test_a_rewind_seeks_only_partitions_still_assigned(service_env, broker):
    settings = ServiceSettings()
    app, topics = make_app(settings, group="batch-revoked")
    produce_json(broker, settings.chat_topic, [chat_message() for _ in range(40)])
    records = read_topic(broker, settings.chat_topic, until=40)
    partitions = sorted({r.partition() for r in records})
    assert len(partitions) > 1
    consumer = app.get_consumer(auto_commit_enable=False)
    try:
        # what a rebalance leaves: only the first partition is still ours
        consumer.assign([TopicPartition(topics.chat.name, partitions[0], 0)])
        batching._rewind(consumer, records)
        kept = [r for r in records if r.partition() == partitions[0]]
        first = consumer.consume(len(kept), 10)
        assert [m.offset() for m in first][:1] == [min(r.offset() for r in kept)]
    finally:
        consumer.close()
