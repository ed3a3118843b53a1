"""Benchmark: how soon a scored message shows up in Redis, and the highest rate kept up with.

Starts its own Tansu broker, uses Redis (the one at REDIS_URL if it answers, else its own
`redis-server`; only keys under a unique prefix, deleted afterwards) and runs the real
`redis_aggregator/main.py` as a process.

1. Latency: scored messages are produced at a fixed rate (200/s) to long-running conversations;
   a watcher polls the `conversations:active` sorted set (written in the same Redis transaction
   as the conversation value, scored by the message's timestamp) and records when each message
   became visible. Produce-to-visible p50/p99 are printed, and the same for the fleet totals.
2. Highest rate: a backlog is produced at once; the rate is messages / time until the fleet
   totals count all of them.

Usage: .venv/bin/python bench/aggregator.py [--quick]
Last line: RESULT aggregator ratio=<1000/p99_ms> target=1.0 p50_ms=... p99_ms=... max_rate=...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis
from confluent_kafka import Producer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supportsim.contract.messages import new_id  # noqa: E402
from supportsim.contract.redis_keys import clear_prefix  # noqa: E402
from supportsim.local.broker import LocalBroker, LocalRedis  # noqa: E402
from supportsim.local.processes import REPO_ROOT, spawn, stop_process  # noqa: E402

RATE = 200  # messages per second in the latency phase
MOODS = ["angry", "confused", "impatient", "polite", "sarcastic"]
PRODUCTS = ["laptop", "phone", "router", "printer", "headphones", "tablet", "camera"]


def scored(conversation_id: str, turn: int, index: int, timestamp_ms: int) -> dict:
    """A scored message with a realistic size (~600 bytes)."""
    score = ((index * 7919) % 2001 - 1000) / 1000
    label = "positive" if score > 0.3 else "negative" if score < -0.3 else "neutral"
    return {
        "conversation_id": conversation_id,
        "message_id": new_id(),
        "turn": turn,
        "role": "customer" if turn % 2 == 0 else "agent",
        "text": "I have been waiting for a replacement for two weeks and nobody answers. " * 3,
        "timestamp_ms": timestamp_ms,
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
        "sentiment": {"label": label, "score": score, "model": "bench"},
    }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


class Bench:
    """The broker, Redis keys and aggregator process of one benchmark run."""

    def __init__(self, work: Path):
        self.work = work
        self.prefix = f"bench-{new_id()[:8]}:"
        self.broker = LocalBroker(work / "broker.log")
        self.redis = LocalRedis(
            os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), work / "redis.log"
        )
        self.process = None
        self.client: redis.Redis | None = None

    def start(self) -> None:
        """Broker, Redis, topics, then the aggregator; wait until it answers."""
        self.broker.start()
        self.redis.start()
        self.client = redis.Redis.from_url(self.redis.url, decode_responses=True)
        env = {
            **self.broker.client_env,
            "REDIS_URL": self.redis.url,
            "REDIS_KEY_PREFIX": self.prefix,
            "STATE_DIR": str(self.work / "state"),
            "SCORED_PARTITIONS": "4",
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
        os.environ.update(env)
        from supportsim.kafka.app import make_app
        from supportsim.settings import ServiceSettings

        make_app(ServiceSettings(), group="bench-setup", exactly_once=False)  # create topics
        self.topic = ServiceSettings().scored_topic
        argv = [sys.executable, str(REPO_ROOT / "redis_aggregator" / "main.py")]
        self.process = spawn(argv, self.work / "aggregator.log", env)
        self.producer = Producer({"bootstrap.servers": self.broker.address, "linger.ms": 1})
        warmup = new_id()
        self.send(scored(warmup, 0, 0, int(time.time() * 1000)))
        self.producer.flush()
        deadline = time.monotonic() + 120
        while self.fleet_messages() < 1:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"aggregator did not start; see {self.work / 'aggregator.log'}")
            time.sleep(0.1)
        self.sent = 1

    def send(self, message: dict) -> None:
        """Produce one message keyed by its conversation."""
        self.producer.produce(
            self.topic, key=message["conversation_id"].encode(), value=json.dumps(message)
        )
        self.producer.poll(0)

    def fleet_messages(self) -> int:
        """Messages counted in the fleet totals so far."""
        value = self.client.get(self.prefix + "fleet")
        return json.loads(value)["messages"] if value else 0

    def latency(self, seconds: float, conversations: int = 50) -> tuple[list[float], list[float]]:
        """Produce at RATE for `seconds`; return per-message and fleet latencies in ms."""
        ids = [new_id() for _ in range(conversations)]
        produced: dict[str, list[int]] = {c: [] for c in ids}  # timestamps, in turn order
        fleet_marks: list[tuple[int, float]] = []  # (fleet count after this send, send time)
        seen: dict[str, int] = {c: 0 for c in ids}  # how many of each conversation are visible
        latencies: list[float] = []
        fleet_latencies: list[float] = []
        total = int(seconds * RATE)
        done = threading.Event()
        lock = threading.Lock()

        def watch() -> None:
            fleet_next = 0
            while not done.is_set():
                now = time.time() * 1000
                scores = dict(
                    self.client.zrange(self.prefix + "conversations:active", 0, -1, withscores=True)
                )
                fleet_count = self.fleet_messages()
                with lock:
                    for conversation_id, stamps in produced.items():
                        visible = scores.get(conversation_id)
                        while (
                            visible is not None
                            and seen[conversation_id] < len(stamps)
                            and (stamps[seen[conversation_id]] <= visible)
                        ):
                            latencies.append(now - stamps[seen[conversation_id]])
                            seen[conversation_id] += 1
                    while (
                        fleet_next < len(fleet_marks) and fleet_marks[fleet_next][0] <= fleet_count
                    ):
                        fleet_latencies.append(now - fleet_marks[fleet_next][1])
                        fleet_next += 1
                time.sleep(0.005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        start = time.time()
        last_stamp = 0
        for index in range(total):
            target = start + index / RATE
            pause = target - time.time()
            if pause > 0:
                time.sleep(pause)
            conversation_id = ids[index % conversations]
            stamp = max(int(time.time() * 1000), last_stamp + 1)  # unique, increasing
            last_stamp = stamp
            with lock:
                turn = len(produced[conversation_id])
                produced[conversation_id].append(stamp)
                self.sent += 1
                fleet_marks.append((self.sent, stamp))
            self.send(scored(conversation_id, turn, index, stamp))
        self.producer.flush()
        deadline = time.monotonic() + 60
        while len(latencies) < total and time.monotonic() < deadline:
            time.sleep(0.05)
        while len(fleet_latencies) < total and time.monotonic() < deadline:
            time.sleep(0.05)
        done.set()
        watcher.join()
        if len(latencies) < total:
            raise SystemExit(f"only {len(latencies)} of {total} messages became visible")
        return latencies, fleet_latencies

    def cpu_seconds(self) -> float:
        """CPU time the aggregator process has used so far (user + system)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def max_rate(self, count: int, conversations: int = 200) -> tuple[float, float]:
        """Produce `count` messages at once; return the rate at which the fleet counted them,
        and the aggregator's CPU time per message in microseconds."""
        ids = [new_id() for _ in range(conversations)]
        before = self.fleet_messages()
        cpu_before = self.cpu_seconds()
        start = time.time()
        stamp = int(start * 1000)
        for index in range(count):
            conversation_id = ids[index % conversations]
            self.send(scored(conversation_id, index // conversations, index, stamp))
        self.producer.flush()
        deadline = time.monotonic() + 600
        while self.fleet_messages() < before + count:
            if time.monotonic() > deadline:
                raise SystemExit("the backlog was not processed within 10 minutes")
            time.sleep(0.05)
        elapsed = time.time() - start
        return count / elapsed, (self.cpu_seconds() - cpu_before) / count * 1e6

    def stop(self) -> None:
        """Stop everything started here and delete the keys written."""
        if self.process is not None:
            stop_process(self.process)
        if self.client is not None:
            clear_prefix(self.client, self.prefix)
        self.redis.stop()
        self.broker.stop()


def main() -> None:
    """Run both phases and print the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter phases (under 5 minutes)")
    args = parser.parse_args()
    seconds, backlog = (20, 20_000) if args.quick else (60, 60_000)
    work = Path(tempfile.mkdtemp(prefix="bench-aggregator-"))
    bench = Bench(work)
    try:
        bench.start()
        print(f"latency: {RATE} messages/s for {seconds} s ...", flush=True)
        latencies, fleet_latencies = bench.latency(seconds)
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        fleet_p50, fleet_p99 = percentile(fleet_latencies, 50), percentile(fleet_latencies, 99)
        print(
            f"conversation value: n={len(latencies)} p50={p50:.0f} ms p99={p99:.0f} ms "
            f"mean={statistics.fmean(latencies):.0f} ms max={max(latencies):.0f} ms"
        )
        print(f"fleet totals: p50={fleet_p50:.0f} ms p99={fleet_p99:.0f} ms")
        print(f"highest rate: backlog of {backlog} messages ...", flush=True)
        rate, cpu_us = bench.max_rate(backlog)
        print(
            f"highest sustained rate: {rate:.0f} messages/s "
            f"({cpu_us:.0f} us of aggregator CPU per message, so {1e6 / cpu_us:.0f}/s on a "
            f"core of its own; this machine is shared, load {os.getloadavg()[0]:.1f})"
        )
        print(
            f"RESULT aggregator ratio={1000 / p99:.2f} target=1.0 p50_ms={p50:.0f} "
            f"p99_ms={p99:.0f} max_rate={rate:.0f} fleet_p50_ms={fleet_p50:.0f} "
            f"fleet_p99_ms={fleet_p99:.0f} cpu_us_per_message={cpu_us:.0f} rate={RATE}"
        )
    finally:
        bench.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
