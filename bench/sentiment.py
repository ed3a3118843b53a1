"""Benchmark: the sentiment service's throughput against the bare model on the same texts.

Starts its own Tansu broker and produces a backlog of chat messages whose texts come from the
sentiment dataset (`supportsim/data/sentiment`; a quarter are two sentences of the same speaker
and label joined, for realistic length variety) across many conversations. Then, in this one
process, with one loaded model and the same torch thread count:

1. service: the sentiment service's own loop (`BatchLoop` + `score_records`, wired as
   `run_sentiment_service` wires them) replays the backlog from offset 0 with exactly-once
   transactions, timed from the start of its first batch to the commit of its last one (the
   consumer group join before it is not counted);
2. raw batch: after each of the service's batches, `Scorer.score_batch` on the same texts
   (batch 32), timed apart and left out of the service's time;
3. single: after each batch, its first 8 texts one per call (batch 1), as the original scored;
4. sorted: many texts (2,000; quick 1,000) in one `score_batch` call, which sorts them by length
   so that padding is minimal (an upper bound a stream cannot reach; for information).

ratio = service / raw batch: the share of the model's speed the service keeps after Kafka,
validation and transactions. batch_speedup = raw batch / single. Interleaving the three
measurements batch by batch gives them the same share of a shared machine's changing load.
model_share: the part of the service's own time spent inside the model.

Usage: .venv/bin/python bench/sentiment.py [--quick] [--messages N] [--threads N]
Last line: RESULT sentiment ratio=<service/raw_batch> target=0.8 service_msgs_per_s=...
raw_batch_msgs_per_s=... single_msgs_per_s=... batch_speedup=<raw_batch/single> ...
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from confluent_kafka import Producer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supportsim.contract.messages import new_id, now_ms  # noqa: E402
from supportsim.kafka.app import make_app  # noqa: E402
from supportsim.kafka.batch_loop import BatchLoop  # noqa: E402
from supportsim.kafka.reader import TopicReader  # noqa: E402
from supportsim.kafka.reader import count as count_offsets  # noqa: E402
from supportsim.local.broker import LocalBroker  # noqa: E402
from supportsim.sentiment.model import Scorer, load_examples  # noqa: E402
from supportsim.sentiment.service import SentimentSettings, score_records  # noqa: E402
from supportsim.settings import KafkaSettings  # noqa: E402

BATCH = 32
TURNS = 12
MOODS = ["angry", "confused", "impatient", "polite", "sarcastic"]
PRODUCTS = ["laptop", "phone", "router", "printer", "headphones", "tablet", "camera"]


def backlog(count: int, seed: int = 5) -> list[dict]:
    """`count` chat messages with dataset texts, conversations of TURNS turns interleaved."""
    rng = random.Random(seed)
    pools: dict[tuple[str, str], list[str]] = {}
    for example in load_examples("train") + load_examples("test"):
        pools.setdefault((example.role, example.label), []).append(example.text)
    conversations = [new_id() for _ in range(max(1, count // TURNS))]
    messages = []
    for index in range(count):
        cid = conversations[index % len(conversations)]
        turn = index // len(conversations)
        role = "customer" if turn % 2 == 0 else "agent"
        label = rng.choice(["negative", "neutral", "positive"])
        pool = pools.get((role, label)) or pools[(role, "neutral")]
        text = rng.choice(pool)
        if rng.random() < 0.25:
            text = f"{text} {rng.choice(pool)}"
        messages.append(
            {
                "conversation_id": cid,
                "message_id": new_id(),
                "turn": turn,
                "role": role,
                "text": text,
                "timestamp_ms": now_ms(),
                "customer": {
                    "name": "Dana",
                    "mood": MOODS[index % len(MOODS)],
                    "product": PRODUCTS[index % len(PRODUCTS)],
                },
                "agent": {"name": "Sam"},
                "model": "bench",
                "prompt_tokens": 120,
                "completion_tokens": 40,
                "latency_ms": 900,
                "final": False,
                "end_reason": None,
            }
        )
    return messages


class TimedScorer:
    """The scorer, counting the seconds spent in the model (inside the service's batches)."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        self.name = scorer.name
        self.seconds = 0.0

    def score_batch(self, texts: list[str], batch_size: int = BATCH):
        """Score as the scorer does, timed."""
        started = time.perf_counter()
        try:
            return self.scorer.score_batch(texts, batch_size=batch_size)
        finally:
            self.seconds += time.perf_counter() - started


class InterleavedLoop(BatchLoop):
    """The service loop; after each batch it scores the same texts raw, timed apart.

    The service is timed from the start of its first batch to the commit of its last, less the
    time spent in the raw measurements in between, so that both see the same load.
    """

    def __init__(self, *args, scorer: Scorer, singles_per_batch: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.scorer = scorer
        self.singles_per_batch = singles_per_batch
        self.first: float | None = None
        self.last: float | None = None
        self.inserted = 0.0  # seconds of raw measurements so far
        self.inserted_at_last = 0.0
        self.raw = Rate()
        self.single = Rate()

    def _process(self, consumer, producer, records) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        super()._process(consumer, producer, records)
        self.last = time.perf_counter()
        self.inserted_at_last = self.inserted
        texts = [json.loads(r.value())["text"] for r in records]
        started = time.perf_counter()
        self.raw.time(lambda: self.scorer.score_batch(texts, batch_size=BATCH), len(texts))
        for text in texts[: self.singles_per_batch]:
            self.single.time(lambda t=text: self.scorer.score_batch([t], batch_size=1), 1)
        self.inserted += time.perf_counter() - started

    @property
    def rate(self) -> float:
        """Messages per second of the service alone."""
        return self.processed / (self.last - self.first - self.inserted_at_last)


class Rate:
    """Messages and seconds of one kind of measurement, accumulated."""

    def __init__(self) -> None:
        self.messages = 0
        self.seconds = 0.0

    def time(self, work, messages: int) -> None:
        """Run `work`, counting its time and `messages`."""
        started = time.perf_counter()
        work()
        self.seconds += time.perf_counter() - started
        self.messages += messages

    @property
    def per_second(self) -> float:
        """Messages per second."""
        return self.messages / self.seconds


def run_service(
    settings: SentimentSettings, scorer: Scorer, count: int, singles_per_batch: int
) -> tuple[InterleavedLoop, float]:
    """Replay the chat topic through the service loop, raw measurements interleaved.

    Returns the loop (rates, transactions) and the share of the service's time in the model.
    """
    app, topics = make_app(settings, group="sentiment-analysis")
    timed = TimedScorer(scorer)
    loop = InterleavedLoop(
        app,
        topics.chat.name,
        lambda records: score_records(records, timed, topics, settings.service_name),
        max_batch=settings.sentiment_batch_size,
        scorer=scorer,
        singles_per_batch=singles_per_batch,
    )
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        loop.run(max_messages=count, idle_timeout=60)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    if loop.processed < count or loop.first is None or loop.last is None:
        raise SystemExit(f"the service processed {loop.processed} of {count} messages")
    return loop, timed.seconds * loop.rate / loop.processed


def scored_ids(address: str, topic: str) -> tuple[int, set]:
    """Read `topic` to its end, read_committed: (records, distinct message_ids)."""
    kafka = KafkaSettings(broker_address=address)
    with TopicReader(kafka=kafka, isolation="read_committed", purpose="bench-check") as reader:
        values = [record.value for record in reader.read(topic, stall_timeout=60)]
    return len(values), {json.loads(value)["message_id"] for value in values}


def sorted_rate(scorer: Scorer, texts: list[str]) -> float:
    """Messages/s scoring all texts in one call (length-sorted batches of BATCH)."""
    started = time.perf_counter()
    scorer.score_batch(texts, batch_size=BATCH)
    return len(texts) / (time.perf_counter() - started)


def produce(address: str, topic: str, messages: list[dict]) -> None:
    """Produce the backlog keyed by conversation."""
    producer = Producer({"bootstrap.servers": address, "linger.ms": 5})
    for index, message in enumerate(messages):
        producer.produce(topic, key=message["conversation_id"].encode(), value=json.dumps(message))
        if index % 1000 == 999:
            producer.flush()
    if producer.flush(30):
        raise SystemExit("the backlog was not delivered")


def main() -> None:
    """Produce the backlog, run the service with raw scoring interleaved; print RESULT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 messages (under 5 minutes)")
    parser.add_argument("--messages", type=int, help="backlog size (default 5,000; quick 2,000)")
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("SENTIMENT_THREADS", "1")),
        help="torch threads for service and raw scoring alike (default SENTIMENT_THREADS or 1)",
    )
    args = parser.parse_args()
    count = args.messages or (2000 if args.quick else 5000)
    singles_per_batch = 8
    sorted_count = min(count, 1000 if args.quick else 2000)
    work = Path(tempfile.mkdtemp(prefix="bench-sentiment-"))
    broker = LocalBroker(work / "broker.log")
    try:
        broker.start()
        os.environ.update(
            {
                **broker.client_env,
                "STATE_DIR": str(work / "state"),
                "LOG_LEVEL": "WARNING",
            }
        )
        settings = SentimentSettings(sentiment_threads=args.threads, sentiment_batch_size=BATCH)
        messages = backlog(count)
        texts = [m["text"] for m in messages]
        lengths = [len(t) for t in texts]
        print(
            f"backlog: {count} messages, text length mean {statistics.fmean(lengths):.0f} "
            f"chars (max {max(lengths)}), threads {args.threads}, batch {BATCH}, "
            f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
            flush=True,
        )
        make_app(settings, group="bench-setup", exactly_once=False)  # topics, as the service
        produce(broker.address, settings.chat_topic, messages)
        print(f"produced to {settings.chat_topic} on {broker.address}", flush=True)

        started = time.perf_counter()
        scorer = Scorer(settings.sentiment_model, threads=args.threads)
        print(f"model {scorer.name} loaded in {time.perf_counter() - started:.1f} s", flush=True)
        scorer.score_batch(texts[: BATCH * 2], batch_size=BATCH)  # warm-up

        loop, model_share = run_service(settings, scorer, count, singles_per_batch)
        service, raw, single = loop.rate, loop.raw.per_second, loop.single.per_second
        print(
            f"service: {service:.1f} messages/s ({loop.batches} transactions, "
            f"{count / loop.batches:.1f} messages each; {model_share:.0%} of its time in the "
            f"model)\n"
            f"raw batch, the same batches in between: {raw:.1f} messages/s\n"
            f"single (batch 1, {loop.single.messages} texts in between): {single:.1f} messages/s",
            flush=True,
        )
        whole = sorted_rate(scorer, texts[:sorted_count])
        print(f"one sorted call over {sorted_count} texts: {whole:.1f} messages/s", flush=True)

        records, ids = scored_ids(broker.address, settings.scored_topic)
        expected = {m["message_id"] for m in messages}
        offsets = count_offsets([settings.scored_topic], kafka=KafkaSettings(), exact=True)
        print(
            f"check: {records} scored records, {len(ids & expected)} of {count} message_ids, "
            f"{len(ids - expected)} unknown; chat-scored offsets "
            f"{offsets[settings.scored_topic]}",
            flush=True,
        )
        if ids != expected:
            raise SystemExit("the service did not score every message exactly once by id")
        print(
            f"RESULT sentiment ratio={service / raw:.2f} target=0.8 "
            f"service_msgs_per_s={service:.1f} raw_batch_msgs_per_s={raw:.1f} "
            f"single_msgs_per_s={single:.1f} batch_speedup={raw / single:.2f} "
            f"sorted_msgs_per_s={whole:.1f} model_share={model_share:.2f} messages={count} "
            f"threads={args.threads} batch={BATCH} load={os.getloadavg()[0]:.1f}"
        )
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
