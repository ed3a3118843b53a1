"""The Redis aggregator as a real process, through the real broker and a real Redis.

Every Redis value is compared with `reference`, an independent computation from the produced
messages themselves: after a plain run with bad input mixed in, after kill -9 and a restart, after
a replay into a fresh consumer group, and across a Redis outage of 10 seconds.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import threading
import time
from collections import Counter
from typing import Any

import pytest
import redis
from quixstreams.sinks.base import SinkBackpressureError, SinkBatch

from supportsim.contract.live_view import (
    Conversation,
    Fleet,
    Pipeline,
    PipelinePoint,
    SeriesPoint,
    encode,
)
from supportsim.contract.messages import new_id, now_ms
from supportsim.contract.redis_keys import RedisKeys, clear_prefix
from supportsim.kafka.app import make_app
from supportsim.live.store import DashboardStore
from supportsim.local.processes import free_port, spawn, stop_process, wait_for_port
from supportsim.settings import ServiceSettings
from supportsim.sinks.live_folds import Limits
from supportsim.sinks.live_view import ConversationSink
from tests.support import ServiceProcess, produce, produce_json, read_topic, values

RETENTION_S = 3600
BUCKET_S = 30  # not the default 10 s: the dashboard reads the bucket size from the data
BUCKETS = 5
RECENT = 4
AGGREGATOR_ENV = {
    "CONVERSATION_RETENTION_S": str(RETENTION_S),
    "SERIES_BUCKET_S": str(BUCKET_S),
    "SERIES_BUCKETS": str(BUCKETS),
    "RECENT_MESSAGES": str(RECENT),
    "REDIS_RETRY_MAX_S": "2",
    "REPLICA_INDEX": "0",  # as `supportsim up` sets it: a restart fences its predecessor
}
MOODS = ["angry", "confused", "polite"]
PRODUCTS = ["laptop", 'phone "pro"', "router, v2"]
REASONS = ["turn_limit", "goodbye", "error"]
OUTCOMES = ["resolved", "unresolved", "gave_up"]


# --------------------------------------------------------------------------- messages


def conversation(
    rng: random.Random, start_ms: int, turns: int, *, ends: bool, step_ms: int = 700
) -> list[dict]:
    """Scored messages of one conversation, one every `step_ms`."""
    cid = new_id()
    persona = {"name": "Zoë", "mood": rng.choice(MOODS), "product": rng.choice(PRODUCTS)}
    reason = rng.choice(REASONS)
    outcome = rng.choice([*OUTCOMES, None])
    # about half the conversations have a scenario card (older data and scripted bots have none)
    card = (
        {
            "scenario": "late delivery",
            "id": f"card-{rng.randint(1, 9)}",
            "product": persona["product"],
            "facts": {"order": "A-17"},
            "wants": 'a refund <b>"now"</b>',
            "refuses": "store credit",
            "patience": 3,
        }
        if rng.random() < 0.5
        else None
    )
    messages = []
    for turn in range(turns):
        final = ends and turn == turns - 1
        score = rng.choice([-1.0, 1.0, 0.0, round(rng.uniform(-1, 1), 9)])
        label = "positive" if score > 0.3 else "negative" if score < -0.3 else "neutral"
        messages.append(
            {
                "conversation_id": cid,
                "message_id": new_id(),
                "turn": turn,
                "role": "customer" if turn % 2 == 0 else "agent",
                "text": f'turn {turn}: "ça va?" {rng.random()}\nnew line, tab\t and \\ backslash',
                "timestamp_ms": start_ms + turn * step_ms,
                "customer": persona,
                "agent": {"name": "Sam"},
                "model": "test-model",
                "prompt_tokens": rng.randint(0, 500),
                "completion_tokens": rng.randint(0, 200),
                "latency_ms": rng.randint(0, 5000),
                "final": final,
                "end_reason": reason if final else None,
                "sentiment": {
                    "label": label,
                    "score": score,
                    "model": "test-scorer",
                },
            }
        )
        extra = messages[-1]
        if card is not None and extra["role"] == "customer":
            extra["card"] = card
        if extra["role"] == "agent" and rng.random() < 0.5:
            extra["remedy"] = rng.choice(["refund", "replacement"])
        if final and outcome is not None:
            extra["outcome"] = outcome
    return messages


def fleet_stream(seed: int, conversations: int, *, start_ms: int) -> list[dict]:
    """Messages of many conversations interleaved in time order, with producer duplicates and
    late older turns (to be ignored) and turns after the end (to be dead-lettered) mixed in."""
    rng = random.Random(seed)
    per_conversation = [
        conversation(
            rng,
            start_ms + rng.randint(0, 20_000),
            rng.randint(1, 9),
            ends=rng.random() < 0.6,
        )
        for _ in range(conversations)
    ]
    stream = sorted(
        (m for c in per_conversation for m in c), key=lambda m: (m["timestamp_ms"], m["turn"])
    )
    noisy: list[dict] = []
    for message in stream:
        noisy.append(message)
        roll = rng.random()
        if roll < 0.05:
            noisy.append(dict(message))  # producer duplicate: same message_id
        elif roll < 0.08 and message["turn"] > 0:
            noisy.append({**message, "message_id": new_id(), "turn": 0})  # an older turn
        elif roll < 0.10 and message["final"]:
            noisy.append({**message, "message_id": new_id(), "turn": message["turn"] + 1})
    return noisy


def after_the_end(messages: list[dict]) -> list[dict]:
    """The messages that come after their conversation's final turn (protocol violations)."""
    final_turn: dict[str, int] = {}
    late = []
    for message in messages:
        cid = message["conversation_id"]
        if cid in final_turn and message["turn"] > final_turn[cid]:
            late.append(message)
        elif message["final"] and cid not in final_turn:
            final_turn[cid] = message["turn"]
    return late


# --------------------------------------------------------------------------- the reference


def average(numbers: list[float]) -> float | None:
    return sum(numbers) / len(numbers) if numbers else None


def reference(messages: list[dict], now: int) -> dict[str, Any]:
    """What Redis must hold for these messages (produced in this order), computed directly."""
    retention_ms = RETENTION_S * 1000
    accepted: dict[str, list[dict]] = {}
    for message in messages:
        kept = accepted.setdefault(message["conversation_id"], [])
        if kept and (kept[-1]["final"] or message["turn"] <= kept[-1]["turn"]):
            continue
        kept.append(message)
    conversations = {}
    for cid, kept in accepted.items():
        last = kept[-1]
        conversations[cid] = {
            "conversation_id": cid,
            "customer": last["customer"],
            "agent": last["agent"],
            "model": last["model"],
            "status": "ended" if last["final"] else "active",
            "end_reason": last["end_reason"] if last["final"] else None,
            "messages": len(kept),
            "last_turn": last["turn"],
            "sentiment_avg": average([m["sentiment"]["score"] for m in kept]),
            "sentiment_last": last["sentiment"]["score"],
            "sentiments": [
                {
                    "turn": m["turn"],
                    "role": m["role"],
                    "label": m["sentiment"]["label"],
                    "score": m["sentiment"]["score"],
                }
                for m in kept
            ][-1000:],
            "recent": [
                {
                    "message_id": m["message_id"],
                    "turn": m["turn"],
                    "role": m["role"],
                    "text": m["text"],
                    "label": m["sentiment"]["label"],
                    "score": m["sentiment"]["score"],
                    "timestamp_ms": m["timestamp_ms"],
                }
                for m in kept
            ][-RECENT:],
            "started_ms": kept[0]["timestamp_ms"],
            "updated_ms": last["timestamp_ms"],
            "ended_ms": last["timestamp_ms"] if last["final"] else None,
            "prompt_tokens": sum(m["prompt_tokens"] for m in kept),
            "completion_tokens": sum(m["completion_tokens"] for m in kept),
            "latency_ms_avg": average([m["latency_ms"] for m in kept]),
            "roles": {
                role: {
                    "messages": len(scores),
                    "sentiment_avg": average(scores),
                    "sentiment_first": scores[0],
                    "sentiment_last": scores[-1],
                }
                for role in ("customer", "agent")
                if (scores := [m["sentiment"]["score"] for m in kept if m["role"] == role])
            },
            "card": next((m["card"] for m in reversed(kept) if m.get("card")), None),
            "remedy": next((m["remedy"] for m in reversed(kept) if m.get("remedy")), None),
            "outcome": last.get("outcome") if last["final"] else None,
        }
        for message, item in zip(kept[-RECENT:], conversations[cid]["recent"], strict=True):
            if message.get("remedy"):
                item["remedy"] = message["remedy"]
    everything = [m for kept in accepted.values() for m in kept]
    newest = max(m["timestamp_ms"] for m in everything)
    ongoing = [c for c in conversations.values() if c["status"] == "active"]
    active = [c for c in ongoing if c["updated_ms"] > newest - retention_ms]

    def breakdown(field: str) -> dict:
        groups: dict[str, dict] = {}
        for cid, kept in accepted.items():
            value = kept[0]["customer"][field]
            group = groups.setdefault(value, {"conversations": 0, "active": 0, "scores": []})
            group["conversations"] += 1
            group["active"] += any(c["conversation_id"] == cid for c in active)
            group["scores"] += [m["sentiment"]["score"] for m in kept]
            group.setdefault("customer", [])
            group["customer"] += [m["sentiment"]["score"] for m in kept if m["role"] == "customer"]
        return {
            value: {
                "conversations": g["conversations"],
                "active": g["active"],
                "messages": len(g["scores"]),
                "sentiment_avg": average(g["scores"]),
                "customer_messages": len(g["customer"]),
                "customer_sentiment_avg": average(g["customer"]),
            }
            for value, g in groups.items()
        }

    def latest(role: str) -> list[float]:
        """The latest score of `role` in each active conversation that has one."""
        found = []
        for c in active:
            scores = [m["sentiment"]["score"] for m in accepted[c["conversation_id"]]]
            roles = [m["role"] for m in accepted[c["conversation_id"]]]
            mine = [score for score, who in zip(scores, roles, strict=True) if who == role]
            found += mine[-1:]
        return found

    prompt = sum(m["prompt_tokens"] for m in everything)
    completion = sum(m["completion_tokens"] for m in everything)
    fleet = {
        "active": len(active),
        "ended": len(conversations) - len(ongoing),
        "started": len(conversations),
        "abandoned": len(ongoing) - len(active),
        "messages": len(everything),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "sentiment_avg_active": average([c["sentiment_avg"] for c in active]),
        "sentiment_avg": average([m["sentiment"]["score"] for m in everything]),
        "latency_ms_avg": average([m["latency_ms"] for m in everything]),
        "tokens_per_message": (prompt + completion) / len(everything),
        "end_reasons": dict(
            Counter(c["end_reason"] or "unknown" for c in conversations.values() if c["ended_ms"])
        ),
        "by_mood": breakdown("mood"),
        "by_product": breakdown("product"),
        "roles": {
            role: {
                "messages": sum(m["role"] == role for m in everything),
                "sentiment_avg": average(
                    [m["sentiment"]["score"] for m in everything if m["role"] == role]
                ),
                "sentiment_now": average(latest(role)),
                "sentiment_now_conversations": len(latest(role)),
            }
            for role in ("customer", "agent")
        },
        "updated_ms": newest,
        "series_bucket_ms": BUCKET_S * 1000,
    }
    bucket_ms = BUCKET_S * 1000
    buckets: dict[int, list[dict]] = {}
    for m in everything:
        buckets.setdefault(m["timestamp_ms"] // bucket_ms * bucket_ms, []).append(m)
    oldest_kept = newest // bucket_ms * bucket_ms - (BUCKETS - 1) * bucket_ms
    series = [
        {
            "bucket_ms": bucket,
            "messages": len(ms),
            "sentiment_avg": average([m["sentiment"]["score"] for m in ms]),
            "completion_tokens": sum(m["completion_tokens"] for m in ms),
            "customer_messages": sum(m["role"] == "customer" for m in ms),
            "customer_sentiment_avg": average(
                [m["sentiment"]["score"] for m in ms if m["role"] == "customer"]
            ),
            "agent_sentiment_avg": average(
                [m["sentiment"]["score"] for m in ms if m["role"] == "agent"]
            ),
        }
        for bucket, ms in sorted(buckets.items())
        if bucket >= oldest_kept
    ]

    def expires(c: dict) -> int:
        return (c["ended_ms"] or c["updated_ms"]) + retention_ms

    live = {cid: c for cid, c in conversations.items() if expires(c) > now}
    return {
        "conversations": live,
        "active": {cid: c["updated_ms"] for cid, c in live.items() if c["status"] == "active"},
        "ended": {cid: c["ended_ms"] for cid, c in live.items() if c["status"] == "ended"},
        "fleet": fleet,
        "series": series,
    }


# --------------------------------------------------------------------------- comparing


def differences(actual: Any, expected: Any, path: str = "") -> list[str]:
    """Where `actual` differs from `expected` (floats to 2e-6: averages are rounded to 1e-6)."""
    if isinstance(expected, float) or (isinstance(actual, float) and expected is not None):
        if isinstance(actual, int | float) and abs(actual - expected) <= 2e-6:
            return []
        return [f"{path}: {actual!r} != {expected!r}"]
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = [f"{path}: missing {k}" for k in expected if k not in actual]
        for key in expected.keys() & actual.keys():
            found += differences(actual[key], expected[key], f"{path}.{key}")
        return found
    if isinstance(expected, list) and isinstance(actual, list) and len(actual) == len(expected):
        found = []
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            found += differences(a, e, f"{path}[{index}]")
        return found
    return [] if actual == expected else [f"{path}: {actual!r} != {expected!r}"]


def snapshot(client: redis.Redis, prefix: str) -> dict[str, Any]:
    """Everything the aggregator wrote under `prefix`, decoded."""
    keys = RedisKeys(prefix)
    conversations = {}
    for key in client.scan_iter(f"{prefix}conversation:*", count=1000):
        value = client.get(key)
        if value is not None:
            conversations[key.removeprefix(f"{prefix}conversation:")] = json.loads(value)
    fleet, series = client.get(keys.fleet), client.get(keys.series)
    return {
        "conversations": conversations,
        "active": {m: int(s) for m, s in client.zrange(keys.active, 0, -1, withscores=True)},
        "ended": {m: int(s) for m, s in client.zrange(keys.ended, 0, -1, withscores=True)},
        "fleet": json.loads(fleet) if fleet else None,
        "series": json.loads(series) if series else None,
    }


def layout_problems(what: str, value: Any, model: type) -> list[str]:
    """Fields of `value` that its model (the documented layout) lacks, and the reverse."""
    if not isinstance(value, dict):
        return [f"{what}: not a JSON object"]
    problems = []
    if unknown := set(value) - set(model.model_fields):
        problems.append(f"{what}: undocumented fields {sorted(unknown)}")
    if missing := set(model.model_fields) - set(value):
        problems.append(f"{what}: missing fields {sorted(missing)}")
    return problems


def compare(client: redis.Redis, prefix: str, expected: dict) -> list[str]:
    """Differences between Redis and the expected values, including unexpected keys and
    fields outside the models of supportsim.contract.live_view."""
    actual = snapshot(client, prefix)
    found = differences(actual, expected)
    extra = set(actual["conversations"]) - set(expected["conversations"])
    found += [f"unexpected conversation key {cid}" for cid in extra]
    for cid, value in actual["conversations"].items():
        found += layout_problems(f"conversation {cid}", value, Conversation)
    if actual["fleet"] is not None:
        found += layout_problems("fleet", actual["fleet"], Fleet)
    for point in actual["series"] or []:
        found += layout_problems("series bucket", point, SeriesPoint)
    return found


def wait_until_equal(
    client: redis.Redis, prefix: str, messages: list[dict], service: ServiceProcess, timeout=120.0
) -> dict:
    """Wait until Redis holds exactly the reference values; fail with the differences."""
    deadline = time.monotonic() + timeout
    found: list[str] = []
    while time.monotonic() < deadline:
        expected = reference(messages, now_ms())
        found = compare(client, prefix, expected)
        if not found:
            return expected
        assert service.alive(), f"aggregator died:\n{service.log()[-3000:]}"
        time.sleep(0.5)
    pytest.fail(f"Redis differs from the reference: {found[:8]}\n{service.log()[-3000:]}")


def wait_for_fleet(client: redis.Redis, prefix: str, messages: int, timeout: float = 90.0) -> None:
    """Wait until the fleet totals count `messages` messages."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = client.get(RedisKeys(prefix).fleet)
        if value and json.loads(value)["messages"] >= messages:
            return
        time.sleep(0.2)
    pytest.fail(f"the fleet did not reach {messages} messages")


def wait_for_pipeline(client: redis.Redis, prefix: str, done, timeout: float = 90.0) -> dict:
    """Wait until the `pipeline` counts and the fleet (`pipeline`, `fleet`) satisfy `done`."""
    deadline = time.monotonic() + timeout
    found = None
    keys = RedisKeys(prefix)
    while time.monotonic() < deadline:
        pipeline, fleet = client.get(keys.pipeline), client.get(keys.fleet)
        found = (json.loads(pipeline) if pipeline else None, json.loads(fleet) if fleet else None)
        if found[0] and found[1] and done(*found):
            return found[0]
        time.sleep(0.3)
    pytest.fail(f"pipeline figures never got there: {found}")


def paced(address: str, topic: str, messages: list[dict], seconds: float) -> threading.Thread:
    """Produce `messages` spread over `seconds`, in a background thread (started)."""

    def run() -> None:
        chunks = 20
        size = max(1, -(-len(messages) // chunks))
        for start in range(0, len(messages), size):
            produce_json(address, topic, messages[start : start + size])
            time.sleep(seconds / chunks)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def aggregator_env(service_env) -> dict[str, str]:
    """The service environment plus small aggregate bounds; topics created up front."""
    make_app(ServiceSettings(), group="topics", exactly_once=False)
    return {**service_env, **AGGREGATOR_ENV}


# --------------------------------------------------------------------------- tests


def test_every_redis_value_equals_the_reference_and_bad_input_is_dead_lettered(
    aggregator_env, broker, redis_client, prefix, tmp_path
):
    settings = ServiceSettings()
    service = ServiceProcess("redis_aggregator", aggregator_env, tmp_path).start()
    try:
        rng = random.Random(1)
        hours_ago = now_ms() - 2 * RETENTION_S * 1000
        # long past the retention: one ended (its keys are gone), one silent (abandoned)
        old = conversation(rng, hours_ago, 3, ends=True)
        old += conversation(rng, hours_ago, 2, ends=False)
        produce_json(broker, settings.scored_topic, old)
        wait_for_fleet(redis_client, prefix, len(old))
        stream = fleet_stream(2, 25, start_ms=now_ms() - 30_000)
        good = stream[0]
        bad = [
            (b"k1", b"not json"),
            (good["conversation_id"].encode(), json.dumps({**good, "sentiment": None}).encode()),
            (None, json.dumps({**good, "message_id": new_id(), "turn": 50}).encode()),
            (b"another-key", json.dumps(good).encode()),
            (
                good["conversation_id"].encode(),
                json.dumps({**good, "sentiment": {**good["sentiment"], "score": 2.0}}).encode(),
            ),
            (b"k2", None),
        ]
        produce_json(broker, settings.scored_topic, stream[: len(stream) // 2])
        produce(broker, settings.scored_topic, bad)
        produce_json(broker, settings.scored_topic, stream[len(stream) // 2 :])
        final = next(m for m in stream if m["final"])
        after_end = {**final, "message_id": new_id(), "turn": final["turn"] + 1, "final": False}
        produce_json(broker, settings.scored_topic, [after_end])
        expected = wait_until_equal(redis_client, prefix, old + stream + [after_end], service)

        assert expected["fleet"]["abandoned"] == 1 and expected["fleet"]["ended"] >= 1
        assert not any(m["conversation_id"] in expected["conversations"] for m in old)
        keys = RedisKeys(prefix)
        for cid, value in expected["conversations"].items():
            ttl_ms = redis_client.pttl(keys.conversation(cid))
            expires = (value["ended_ms"] or value["updated_ms"]) + RETENTION_S * 1000
            assert abs(now_ms() + ttl_ms - expires) < 5000, (cid, ttl_ms)

        late = after_the_end(stream + [after_end])
        expected_dead = len(bad) + len(late)
        dead = values(read_topic(broker, settings.dead_letter_topic, until=expected_dead))
        errors = sorted(d["error"] for d in dead)
        assert len(dead) == expected_dead, errors
        assert sum("the conversation ended at turn" in e for e in errors) == len(late), errors
        for fragment in (
            "not JSON",
            "sentiment",
            "no Kafka key",
            "does not match conversation_id",
            "less than or equal to 1",
            "tombstone",
        ):
            assert any(fragment in e for e in errors), (fragment, errors)
        assert all(d["service"] == "redis_aggregator" for d in dead)
        # the aggregator reads the dead-letter topic back: each counted once, on the page
        pipeline = wait_for_pipeline(
            redis_client, prefix, lambda p, _: p["dead_letters"] >= expected_dead
        )
        assert pipeline["dead_letters"] == expected_dead
        assert sum(b["dead_letters"] for b in pipeline["series"]) == expected_dead
        assert layout_problems("pipeline", pipeline, Pipeline) == []
        for point in pipeline["series"]:
            assert layout_problems("pipeline bucket", point, PipelinePoint) == []
        # the dashboard reads the bucket size from the data, not its default of 10 s
        store_view = DashboardStore(redis_client, keys).snapshot()
        assert store_view.bucket_ms == BUCKET_S * 1000
        assert store_view.pipeline.series_bucket_ms == BUCKET_S * 1000
        assert service.alive()
        assert "skipped: duplicate message" in service.log()
    finally:
        service.stop()


def test_how_far_scoring_is_behind_the_chat_in_messages_and_seconds(
    aggregator_env, broker, redis_client, prefix, tmp_path
):
    settings = ServiceSettings()
    rng = random.Random(5)
    start = now_ms() - 60_000
    conversations = [conversation(rng, start + i * 100, 6, ends=i == 0) for i in range(4)]
    chat = [{k: v for k, v in m.items() if k != "sentiment"} for c in conversations for m in c]
    chat.sort(key=lambda m: (m["timestamp_ms"], m["turn"]))
    scored = [m for c in conversations for m in c[:4]]  # scoring got through four turns of each
    service = ServiceProcess("redis_aggregator", aggregator_env, tmp_path).start()
    try:
        # the bots' topic: every turn, a producer duplicate, and a value the scorer rejects
        produce_json(broker, settings.chat_topic, chat + [chat[3]])
        produce(broker, settings.chat_topic, [(b"k", b"not a chat message")])
        produce_json(broker, settings.scored_topic, scored)
        newest_scored = max(m["timestamp_ms"] for m in scored)
        newest_chat = max(m["timestamp_ms"] for m in chat)
        pipeline = wait_for_pipeline(
            redis_client,
            prefix,
            lambda p, f: p["chat_messages"] == len(chat) and f["messages"] == len(scored),
        )
        fleet = json.loads(redis_client.get(RedisKeys(prefix).fleet))
        assert pipeline["chat_messages"] - fleet["messages"] == 8  # messages behind
        assert (pipeline["chat_newest_ms"], fleet["updated_ms"]) == (newest_chat, newest_scored)
        assert sum(b["chat_messages"] for b in pipeline["series"]) == len(chat)
        assert sum(b["chat_completion_tokens"] for b in pipeline["series"]) == sum(
            m["completion_tokens"] for m in chat
        )
        # scoring catches up: nothing behind
        produce_json(broker, settings.scored_topic, [m for c in conversations for m in c[4:]])
        wait_for_pipeline(redis_client, prefix, lambda p, f: f["messages"] == p["chat_messages"])
        assert json.loads(redis_client.get(RedisKeys(prefix).fleet))["updated_ms"] == newest_chat
        # the aggregator reports no dead letter for chat values: the scorer does
        assert (
            values(read_topic(broker, settings.dead_letter_topic, until=lambda r: False, timeout=8))
            == []
        )
        assert service.alive()
    finally:
        service.stop()


def test_kill_9_and_restart_then_a_replay_into_a_fresh_group_give_the_same_values(
    aggregator_env, broker, redis_client, prefix, tmp_path
):
    settings = ServiceSettings()
    stream = fleet_stream(3, 60, start_ms=now_ms() - 60_000)
    service = ServiceProcess("redis_aggregator", aggregator_env, tmp_path).start()
    restarted = None
    try:
        head, rest = stream[:40], stream[40:]
        produce_json(broker, settings.scored_topic, head)
        wait_for_fleet(redis_client, prefix, 1)  # the service is up
        producing = paced(broker, settings.scored_topic, rest, seconds=8)
        time.sleep(2.5)
        service.kill()  # mid-stream: the producer keeps going
        restarted = ServiceProcess("redis_aggregator", aggregator_env, tmp_path).start()
        producing.join()
        wait_until_equal(redis_client, prefix, stream, restarted)
    finally:
        if restarted is not None:
            restarted.stop()
        service.stop()

    clear_prefix(redis_client, prefix)
    replay_env = {
        **aggregator_env,
        "CONSUMER_GROUP_PREFIX": f"{prefix}replay-",
        "STATE_DIR": str(tmp_path / "replay-state"),
    }
    replay = ServiceProcess("redis_aggregator", replay_env, tmp_path).start()
    try:
        wait_until_equal(redis_client, prefix, stream, replay)
    finally:
        replay.stop()


def test_a_redis_outage_of_ten_seconds_loses_nothing(aggregator_env, broker, prefix, tmp_path):
    settings = ServiceSettings()
    port = free_port()
    data = tmp_path / "redis-data"
    data.mkdir()
    argv = [
        shutil.which("redis-server") or "redis-server",
        *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)),
        *("--save", "", "--appendonly", "no"),
    ]
    server = spawn(argv, tmp_path / "redis.log")
    wait_for_port(port, 15, server)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, decode_responses=True)
    env = {**aggregator_env, "REDIS_URL": url}
    stream = fleet_stream(4, 50, start_ms=now_ms() - 60_000)
    service = ServiceProcess("redis_aggregator", env, tmp_path).start()
    try:
        head, rest = stream[:40], stream[40:]
        produce_json(broker, settings.scored_topic, head)
        wait_for_fleet(client, prefix, 1)  # the service is up
        producing = paced(broker, settings.scored_topic, rest, seconds=14)
        time.sleep(2)
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown(save=True)  # a clean stop: Redis keeps what it was sent
        server.wait(15)
        time.sleep(10)
        assert service.alive(), service.log()[-3000:]
        server = spawn(argv, tmp_path / "redis.log")
        wait_for_port(port, 15, server)
        producing.join()
        wait_until_equal(client, prefix, stream, service)
        log = service.log()
        assert "Redis unavailable" in log and "Redis is back" in log
        assert "Traceback" not in log
    finally:
        service.stop()
        stop_process(server)


def test_the_conversation_sink_sets_expiry_from_the_data_and_drops_what_is_past_it(
    redis_client, redis_url, prefix
):
    limits = Limits(retention_ms=60_000)
    keys = RedisKeys(prefix)
    sink = ConversationSink(redis_url, keys, limits)
    now = now_ms()
    records = {
        "ended": {"updated_ms": now - 20_000, "ended_ms": now - 20_000},
        "active": {"updated_ms": now - 5_000, "ended_ms": None},
        "gone": {"updated_ms": now - 70_000, "ended_ms": now - 70_000},
    }
    redis_client.zadd(keys.ended, {"gone": now - 70_000})
    batch = SinkBatch("t", 0)
    for offset, (cid, record) in enumerate(records.items()):
        value = {"conversation_id": cid, **record, "value": encode({"conversation_id": cid})}
        batch.append(value=value, key=cid, timestamp=now, headers=[], offset=offset)
    sink.write(batch)
    assert abs(redis_client.pttl(keys.conversation("ended")) - 40_000) < 3000
    assert abs(redis_client.pttl(keys.conversation("active")) - 55_000) < 3000
    assert not redis_client.exists(keys.conversation("gone"))
    assert redis_client.zrange(keys.ended, 0, -1) == ["ended"]
    assert redis_client.zrange(keys.active, 0, -1) == ["active"]


def test_an_unreachable_redis_asks_the_application_to_back_off():
    sink = ConversationSink(f"redis://127.0.0.1:{free_port()}/0", RedisKeys(), Limits())
    batch = SinkBatch("t", 0)
    value = {"conversation_id": "c", "updated_ms": now_ms(), "ended_ms": None, "value": b"{}"}
    batch.append(value=value, key="c", timestamp=0, headers=[], offset=0)
    delays = []
    for _ in range(3):
        with pytest.raises(SinkBackpressureError) as raised:
            sink.write(batch)
        delays.append(raised.value.retry_after)
    assert delays == [0.5, 1.0, 2.0]


def test_the_comparison_itself():
    assert differences({"a": 0.1234561}, {"a": 0.123456}) == []
    assert differences({"a": [1, 2]}, {"a": [1, 3]}) == [".a[1]: 2 != 3"]
    assert differences({"a": None}, {"a": 0.5}) != []
