"""Benchmark: `supportsim export` memory stays flat as the topic grows.

Starts its own Tansu broker, fills scored topics with conversations of 10 messages (5,000 and
50,000 messages; without `--quick` also 200,000) and exports each in a fresh process. Each
process first exports a 200-message topic (so imports, client threads and caches are warm),
then samples its own RSS every 10 ms while exporting the measured topic; growth = peak RSS
during the export minus RSS just before it.

Baseline, measured in the same run: a load-everything export of the 50,000-message topic (every
message row in a list, grouped in a dict, summarized, sorted, written), whose memory grows with
the topic. The measured ratio is baseline growth / our growth at 50,000 messages; the target is
5 (at least five times less memory). Flatness shows in growth_mb at 5,000, 50,000 (and 200,000)
messages, which stays within a few MB while the baseline grows by about 1.5 MB per 1,000.

Usage: .venv/bin/python bench/export.py [--quick]
Last line: RESULT export ratio=<naive_growth/growth> target=5.0 messages=50000 peak_rss_mb=...
growth_mb=... small_growth_mb=... [huge_growth_mb=...] naive_growth_mb=... rate=<messages/s>
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supportsim.contract.messages import new_id  # noqa: E402
from supportsim.local.broker import LocalBroker  # noqa: E402

TURNS = 10
WARM_MESSAGES = 200
TEXT = (
    "I ordered this {product} three weeks ago and it stopped working after two days. "
    "I have already restarted it twice and nothing changes; what are my options now?"
)
PRODUCTS = ["laptop", "smartphone", "wireless headphones", "smart TV", "tablet", "e-reader"]
MOODS = ["angry", "impatient", "sarcastic", "confused", "polite but firm"]
LABELS = [("negative", -0.7), ("neutral", 0.05), ("positive", 0.6)]


def conversation(index: int, start_ms: int) -> list[dict]:
    """One finished conversation of TURNS scored messages."""
    cid = new_id()
    product = PRODUCTS[index % len(PRODUCTS)]
    messages = []
    for turn in range(TURNS):
        label, score = LABELS[(index + turn) % 3]
        messages.append(
            {
                "conversation_id": cid,
                "message_id": new_id(),
                "turn": turn,
                "role": "agent" if turn % 2 == 0 else "customer",
                "text": TEXT.format(product=product),
                "timestamp_ms": start_ms + index * 1000 + turn,
                "customer": {
                    "name": f"Customer {index}",
                    "mood": MOODS[index % 5],
                    "product": product,
                },
                "agent": {"name": "Sam"},
                "model": "qwen2.5-1.5b",
                "prompt_tokens": 300 + turn,
                "completion_tokens": 40,
                "latency_ms": 1500,
                "final": turn == TURNS - 1,
                "end_reason": "goodbye" if turn == TURNS - 1 else None,
                "sentiment": {"label": label, "score": score, "model": "minilm-v1"},
            }
        )
    return messages


def fill(address: str, topic: str, count: int) -> None:
    """Produce `count` messages (count / TURNS conversations) to `topic`."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": address, "linger.ms": 20})
    start = 1_790_000_000_000
    for index in range(count // TURNS):
        for message in conversation(index, start):
            producer.produce(
                topic, key=message["conversation_id"].encode(), value=json.dumps(message).encode()
            )
        if index % 200 == 0:
            producer.flush()
    assert producer.flush(60) == 0


def naive_export(topic: str, out: Path) -> int:
    """The load-everything baseline: every row in memory, grouped, then written."""
    from supportsim.contract.messages import DeadLetter, parse_scored, to_json
    from supportsim.datasets.rows import jsonl, message_row, summarize
    from supportsim.kafka.reader import TopicReader

    rows = []
    with TopicReader(purpose="bench-naive") as reader:
        for record in reader.read(topic):
            parsed = parse_scored(record.value, service="bench", source_topic=topic)
            if not isinstance(parsed, DeadLetter):
                rows.append(message_row(to_json(parsed), record.partition, record.offset))
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["conversation_id"], []).append(row)
    summaries = sorted(
        (summarize(group) for group in grouped.values()),
        key=lambda s: (s["started_ms"], s["conversation_id"]),
    )
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "messages.jsonl", "w") as file:
        for summary in summaries:
            for row in grouped[summary["conversation_id"]]:
                file.write(jsonl(row))
    with open(out / "conversations.jsonl", "w") as file:
        for summary in summaries:
            file.write(jsonl(summary))
    return len(rows)


def child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: warm up, then measure one export; prints a JSON line."""
    import psutil

    from supportsim.datasets.export import ExportOptions, export

    process = psutil.Process()
    work = Path(args.out)

    def run(topic: str, out: Path) -> int:
        if args.naive:
            return naive_export(topic, out)
        options = ExportOptions(out=out, topic=topic, progress=False, formats=("csv", "jsonl"))
        return export(options).messages

    run(args.warm_topic, work / "warm")
    before = process.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    messages = run(args.topic, work / "measured")
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    print(
        json.dumps(
            {
                "messages": messages,
                "seconds": seconds,
                "before_mb": before / 2**20,
                "peak_mb": peak[0] / 2**20,
                "growth_mb": (peak[0] - before) / 2**20,
            }
        )
    )


def measure(env: dict, topic: str, warm: str, out: Path, naive: bool = False) -> dict:
    """Run one export in a fresh process and return its measurements."""
    argv = [sys.executable, __file__, "--child", "--topic", topic, "--warm-topic", warm]
    argv += ["--out", str(out)] + (["--naive"] if naive else [])
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"export process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5,000 and 50,000 messages only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--warm-topic", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    sizes = {"small": 5_000, "large": 50_000}
    if not args.quick:
        sizes["huge"] = 200_000
    work = Path(tempfile.mkdtemp(prefix="supportsim-bench-export-"))
    broker = LocalBroker(work / "broker.log")
    try:
        broker.start()
        env = {
            **os.environ,
            **broker.client_env,
        }
        os.environ.update(env)
        from supportsim.kafka.app import make_app
        from supportsim.settings import ServiceSettings

        topics = {"warm": WARM_MESSAGES, **sizes}
        for name, count in topics.items():
            settings = ServiceSettings(
                scored_topic=f"bench-{name}", chat_topic=f"bench-{name}-chat"
            )
            make_app(settings, group="bench-setup", exactly_once=False)
            started = time.perf_counter()
            fill(broker.address, f"bench-{name}", count)
            elapsed = time.perf_counter() - started
            print(f"produced {count} messages to bench-{name} in {elapsed:.1f} s")

        results = {}
        for name in sizes:
            results[name] = measure(env, f"bench-{name}", "bench-warm", work / name)
            r = results[name]
            print(
                f"export {r['messages']:>6} messages: {r['seconds']:6.1f} s "
                f"({r['messages'] / r['seconds']:,.0f}/s), RSS before {r['before_mb']:.0f} MB, "
                f"peak {r['peak_mb']:.0f} MB, growth {r['growth_mb']:.1f} MB"
            )
        naive = measure(env, "bench-large", "bench-warm", work / "naive", naive=True)
        print(
            f"load-everything baseline, {naive['messages']} messages: {naive['seconds']:.1f} s, "
            f"growth {naive['growth_mb']:.1f} MB"
        )
        s, big = results["small"], results["large"]
        ratio = naive["growth_mb"] / max(big["growth_mb"], 0.1)
        huge = results.get("huge")
        print(
            f"RESULT export ratio={ratio:.1f} target=5.0 messages={big['messages']} "
            f"peak_rss_mb={big['peak_mb']:.0f} growth_mb={big['growth_mb']:.1f} "
            f"small_messages={s['messages']} small_growth_mb={s['growth_mb']:.1f} "
            + (
                f"huge_messages={huge['messages']} huge_growth_mb={huge['growth_mb']:.1f} "
                if huge
                else ""
            )
            + f"naive_growth_mb={naive['growth_mb']:.1f} "
            f"rate={big['messages'] / big['seconds']:.0f}"
        )
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
