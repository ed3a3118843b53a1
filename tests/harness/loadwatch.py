"""Load figures of a running pipeline: latency percentiles, CPU and memory per service."""

from __future__ import annotations

import contextlib
import math
import threading
import time

import psutil
import redis

from supportsim.local.stack import Stack
from tests.harness.runs import (
    process_table,
)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class LatencyWatcher:
    """Measures chat-to-Redis latency by polling the aggregator's conversation sets.

    `conversations:active` is scored by the timestamp of a conversation's latest message and
    `conversations:ended` by its final message's, written in the same Redis transaction as the
    conversation value; when a score changes, the message with that timestamp_ms (set by the
    bot when it wrote the message to `chat`) has just become visible in Redis.
    """

    def __init__(self, url: str, prefix: str, interval_s: float = 0.05):
        from supportsim.contract.redis_keys import RedisKeys

        self.client = redis.Redis.from_url(url)
        self.keys = RedisKeys(prefix)
        self.interval_s = interval_s
        self.samples_ms: list[float] = []
        self.seen_at_ms: list[float] = []  # when each sample became visible (epoch ms)
        self._seen: dict[tuple[str, bytes], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-watcher", daemon=True)

    def _poll(self, record: bool) -> None:
        now = time.time() * 1000
        rows = [("a", r) for r in self.client.zrange(self.keys.active, 0, -1, withscores=True)]
        recent = self.client.zrangebyscore(self.keys.ended, now - 120_000, "+inf", withscores=True)
        rows += [("e", r) for r in recent]
        for kind, (member, score) in rows:
            if self._seen.get((kind, member)) != score:
                self._seen[(kind, member)] = score
                if record:
                    self.samples_ms.append(now - score)
                    self.seen_at_ms.append(now)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(redis.RedisError):
                self._poll(record=True)
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        """Note what is visible now (not sampled), then sample every change."""
        self._poll(record=False)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        self._thread.join(5)


def service_cpu(stack: Stack) -> dict[str, float]:
    """CPU seconds (user + system) used so far per service, replicas added up."""
    out: dict[str, float] = {}
    for label, pid in process_table(stack).items():
        name = label.rsplit("-", 1)[0]
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            out[name] = out.get(name, 0.0) + times.user + times.system
    return out


def service_rss(stack: Stack) -> dict[str, float]:
    """Resident memory (MB) per service, replicas added up, from the PIDs in processes.json."""
    out: dict[str, float] = {}
    for label, pid in process_table(stack).items():
        name = label.rsplit("-", 1)[0]
        with contextlib.suppress(psutil.Error):
            out[name] = out.get(name, 0.0) + psutil.Process(pid).memory_info().rss / 2**20
    return out
