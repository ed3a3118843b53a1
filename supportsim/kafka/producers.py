"""Producers: transactional ones with the application's id, fencing, and closing them."""

from __future__ import annotations

import logging

from quixstreams import Application
from quixstreams.kafka import Producer

logger = logging.getLogger(__name__)


def transactional_producer(app: Application) -> Producer:
    """A transactional producer with the application's own `transactional.id`.

    (`Application.get_producer(transactional=True)` prefixes the id a second time on Quix Cloud,
    so it would not fence the application's producer nor be fenced by it.)
    """
    config = app.config
    return Producer(
        broker_address=config.broker_address,
        extra_config=dict(config.producer_extra_config),
        transactional=True,
    )


def fence_predecessor(app: Application) -> None:
    """End at once any transaction that a crashed predecessor of this replica left open.

    Quix Streams initialises its transactional producer at the first message it writes. A replica
    restarted after a kill would fence its predecessor only then, but a bot reads the topic it
    writes: if its partitions sit behind the predecessor's open transaction, read_committed gives it
    nothing, so it never writes, and every reader of those partitions waits for good. Kafka aborts
    such a transaction after `transaction.timeout.ms`; Tansu never does. Initialising transactions
    with the same `transactional.id` at startup aborts it now (measured on Tansu: the records behind
    it become readable the moment `init_transactions` returns).
    """
    producer = transactional_producer(app)
    try:
        producer.begin_transaction()  # the first use runs init_transactions, which fences
        producer.abort_transaction()
    finally:
        close_producer(producer)
    transactional_id = app.config.producer_extra_config["transactional.id"]
    logger.info("fenced earlier producers with transactional.id %s", transactional_id)


def close_producer(producer: Producer, timeout: float = 10.0) -> int:
    """Deliver what `producer` holds, then free its librdkafka instance now; return undelivered.

    A Quix Streams producer and its librdkafka producer refer to each other (the error
    callback), so dropping it leaves its threads, broker connections and transactional.id alive
    until a garbage collection; dropping the inner producer ends them at once.
    """
    left = producer.flush(timeout)
    producer._inner_producer = None  # noqa: SLF001 (Quix Streams' Producer has no close)
    return left
