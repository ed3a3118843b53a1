"""Benchmark: 1,000 concurrent scripted conversations through the whole pipeline.

Starts the embedded stack (Tansu broker, Redis, ai_customer x2, ai_support_agent x2,
sentiment_analysis with the real model, redis_aggregator, conversation_starter) in this process
with CONVERSATIONS=1000 scripted conversations, waits until every seed is in Redis and the
pipeline is warm, then measures for a fixed window:

- offered rate: the scripted bots sleep SCRIPTED_THINK_TIME_S inside processing, and each bot
  process handles its partitions one message at a time, so the bots can write at most
  (bot processes / think time) replies per second, however many conversations wait (here
  4 / 0.1 s = 40 replies/s). With 1,000 conversations every bot process always has a backlog,
  so this bound is the rate offered to the pipeline (conversations / think time would be the
  rate of 1,000 independent bots; ours are 4 processes);
- achieved rate: replies that reached Redis per second (the aggregator's fleet totals:
  messages minus conversation starts, whose greetings come from a template without think time);
  the bots' own rate (scripted replies in `chat` stamped inside the window) is printed too, so a
  shortfall shows whether the bots or the pipeline behind them fell short;
- latency from `chat` to Redis: a watcher polls the aggregator's conversation sets every 50 ms
  and takes (time visible - timestamp_ms) of each newly visible message (p50, p99);
- resident memory of every service process (psutil, PIDs from processes.json) at the start and
  the end of the window.

Afterwards the bots stop, the rest drains, and the conversations are verified as in
bench/chaos.py (`exact=` conversations verified / started).

Usage: .venv/bin/python bench/load.py [--quick] [--conversations N] [--think-time S]
Last line: RESULT load ratio=<achieved/offered> target=0.95 offered=... achieved=... p50_ms=...
p99_ms=... rss_start_mb=... rss_end_mb=... (plus bots=, messages_per_s=, exact=)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supportsim.contract.messages import parse_chat  # noqa: E402
from supportsim.settings import RedisSettings, ServiceSettings  # noqa: E402
from tests.harness import (
    loadwatch,  # noqa: E402
    oracle,  # noqa: E402
    readback,  # noqa: E402
    runs,  # noqa: E402
)

SLICE_MS = 30_000


def reply_times(stack, start_ms: int, end_ms: int) -> list[int]:
    """timestamp_ms of the scripted replies in `chat` (first copies) inside [start_ms, end_ms)."""
    seen: set[str] = set()
    stamps = []
    for record in readback.read_records(stack.broker.address, ServiceSettings().chat_topic, 300):
        message = parse_chat(record.value, service="load-bench", source_topic="chat")
        if getattr(message, "model", None) != "scripted" or message.message_id in seen:
            continue
        seen.add(message.message_id)
        if start_ms <= message.timestamp_ms < end_ms:
            stamps.append(message.timestamp_ms)
    return stamps


def slices(start_ms: int, end_ms: int, stamps: list[int], watcher) -> list[str]:
    """Per 30 s of the window: the bots' reply rate and the chat-to-Redis latency."""
    lines = []
    begins = list(range(start_ms, end_ms, SLICE_MS))
    if len(begins) > 1 and end_ms - begins[-1] < SLICE_MS // 2:
        begins.pop()  # a short remainder joins the slice before it (no "60-60 s" line)
    for begin, end in zip(begins, [*begins[1:], end_ms], strict=True):
        rate = sum(begin <= t < end for t in stamps) / ((end - begin) / 1000)
        latencies = [
            latency
            for latency, seen in zip(watcher.samples_ms, watcher.seen_at_ms, strict=True)
            if begin <= seen < end
        ]
        lines.append(
            f"  {(begin - start_ms) / 1000:5.0f}-{(end - start_ms) / 1000:3.0f} s: bots "
            f"{rate:5.1f} replies/s, latency p50 {loadwatch.percentile(latencies, 50):6.0f} ms "
            f"p99 {loadwatch.percentile(latencies, 99):6.0f} ms ({len(latencies)} samples)"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 60 s window (under 5 minutes)")
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--think-time", type=float, default=0.1, help="SCRIPTED_THINK_TIME_S")
    parser.add_argument("--duration", type=float, help="measured seconds (default 60 / 300)")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring")
    parser.add_argument("--no-verify", action="store_true", help="skip the final verification")
    parser.add_argument("--keep", action="store_true", help="keep the run folder (logs)")
    args = parser.parse_args()

    duration = args.duration or (60.0 if args.quick else 300.0)
    config = runs.RunConfig(
        conversations=args.conversations, max_turns=12, think_time_s=args.think_time
    )
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)

    run_dir = Path(tempfile.mkdtemp(prefix="supportsim-load-"))
    redis_url = RedisSettings().redis_url.get_secret_value()
    with runs.running_stack(run_dir, config, redis_url, say) as stack:
        bots = sum(1 for r in stack.replicas if r.spec.name in runs.BOTS)
        offered = bots / config.think_time_s
        say(
            f"{config.conversations} conversations, {bots} bot processes, think time "
            f"{config.think_time_s} s: offered {offered:.1f} replies/s"
        )

        def seeded() -> bool:
            totals = runs.fleet(stack, config.key_prefix)
            return bool(totals) and totals["started"] >= config.conversations

        if not runs.supervise_for(stack, 240, say, until=seeded):
            print(f"RESULT load ratio=0 target=0.95 error=not_seeded run_dir={run_dir}")
            return 1
        say("every seed is in Redis; warming up until Redis is within 3 s of the bots")
        runs.supervise_for(stack, args.warmup, say)

        def caught_up() -> bool:
            newest = (runs.fleet(stack, config.key_prefix) or {}).get("updated_ms") or 0
            return time.time() * 1000 - newest < 3000

        if not runs.supervise_for(stack, 60 if args.quick else 180, say, until=caught_up):
            say("Redis did not catch up with the bots during the warm-up; measuring anyway")

        watcher = loadwatch.LatencyWatcher(stack.redis.url, config.key_prefix)
        rss_start = loadwatch.service_rss(stack)
        cpu_start = loadwatch.service_cpu(stack)
        machine = psutil.cpu_times()
        first = runs.fleet(stack, config.key_prefix)
        window_start, start_ms = time.monotonic(), int(time.time() * 1000)
        watcher.start()
        runs.supervise_for(stack, duration, say)
        last = runs.fleet(stack, config.key_prefix)
        elapsed, end_ms = time.monotonic() - window_start, int(time.time() * 1000)
        watcher.stop()
        rss_end = loadwatch.service_rss(stack)
        cpu_end = loadwatch.service_cpu(stack)
        machine_end = psutil.cpu_times()
        busy = (sum(machine_end) - machine_end.idle) - (sum(machine) - machine.idle)
        machine_busy = busy / (sum(machine_end) - sum(machine))
        load = os.getloadavg()[0]
        restarts = sum(runs.restarts(stack).values())

        messages = last["messages"] - first["messages"]
        replies = messages - (last["started"] - first["started"])
        achieved = replies / elapsed
        stamps = reply_times(stack, start_ms, end_ms)
        bots_rate = len(stamps) / ((end_ms - start_ms) / 1000)
        verification = None
        if not args.no_verify:
            runs.stop_bots(stack)
            drain_s = 90 if args.quick else 300
            verification, _ = oracle.drain_and_verify(stack, config, drain_s, say)

    samples = watcher.samples_ms
    p50, p99 = loadwatch.percentile(samples, 50), loadwatch.percentile(samples, 99)
    for name in sorted(rss_start):
        cpu = (cpu_end.get(name, 0.0) - cpu_start.get(name, 0.0)) / elapsed
        say(
            f"{name}: rss {rss_start[name]:.0f} MB -> {rss_end.get(name, 0):.0f} MB; "
            f"cpu {cpu:.0%} of a core"
        )
    say(
        f"machine: {os.cpu_count()} cores, {machine_busy:.0%} busy during the window "
        f"(all processes, ours and others'), load average {load:.1f}"
    )
    say(
        f"window {elapsed:.0f} s: {messages} messages ({replies} replies) reached Redis; "
        f"bots wrote {bots_rate:.1f} replies/s; {len(samples)} latency samples; "
        f"restarts {restarts}"
    )
    for line in slices(start_ms, end_ms, stamps, watcher):
        say(line)
    if verification is not None:
        for line in verification.lines():
            say(line)
    ok = verification is None or verification.ok
    if ok and not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        say(f"logs kept in {run_dir / 'logs'}")
    exact = f" exact={verification.ratio:.3f}" if verification is not None else ""
    print(
        f"RESULT load ratio={achieved / offered:.3f} target=0.95 offered={offered:.1f} "
        f"achieved={achieved:.1f} p50_ms={p50:.0f} p99_ms={p99:.0f} "
        f"rss_start_mb={sum(rss_start.values()):.0f} rss_end_mb={sum(rss_end.values()):.0f} "
        f"bots={bots_rate:.1f} messages_per_s={messages / elapsed:.1f} "
        f"conversations={config.conversations} window_s={elapsed:.0f}{exact}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
