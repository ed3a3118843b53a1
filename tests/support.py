"""Test-side Kafka and process helpers: produce, read back, run a service as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from confluent_kafka import Consumer, Producer

from supportsim.contract.messages import ScoredMessage, new_id, now_ms
from supportsim.local.broker import LOCAL_ISOLATION_LEVEL
from supportsim.local.processes import REPO_ROOT, spawn, stop_process


def produce(address: str, topic: str, records: Iterable[tuple[bytes | None, bytes | None]]) -> int:
    """Produce (key, raw value) pairs and wait for delivery; return how many."""
    producer = Producer({"bootstrap.servers": address, "linger.ms": 5})
    count = 0
    for key, value in records:
        producer.produce(topic, key=key, value=value)
        count += 1
        if count % 1000 == 0:
            producer.flush()
    assert producer.flush(30) == 0, "messages not delivered"
    return count


def produce_json(address: str, topic: str, messages: Iterable[dict]) -> int:
    """Produce contract messages as JSON, keyed by conversation_id."""
    return produce(
        address,
        topic,
        ((m["conversation_id"].encode(), json.dumps(m).encode()) for m in messages),
    )


def read_topic(
    address: str,
    topic: str,
    *,
    until: Callable[[list], bool] | int,
    timeout: float = 60.0,
    isolation: str = LOCAL_ISOLATION_LEVEL,
) -> list:
    """Read a topic from the start until `until(records)` holds (or N records); return records.

    Records are confluent-kafka messages. Reads as the services do on the embedded broker
    (`isolation`: read_uncommitted; Tansu gives read_committed readers nothing while any
    transaction is open on a partition).
    """
    predicate = (lambda r: len(r) >= until) if isinstance(until, int) else until
    consumer = Consumer(
        {
            "bootstrap.servers": address,
            "group.id": f"test-reader-{new_id()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": isolation,
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe([topic])
    records: list = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not predicate(records):
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            records.append(msg)
        return records
    finally:
        consumer.close()


def values(records: list) -> list[dict]:
    """JSON values of records."""
    return [json.loads(r.value()) for r in records]


def chat_message(conversation_id: str | None = None, turn: int = 0, **overrides) -> dict:
    """A valid `chat` message as a dict."""
    message = {
        "conversation_id": conversation_id or new_id(),
        "message_id": new_id(),
        "turn": turn,
        "role": "customer" if isinstance(turn, int) and turn % 2 == 0 else "agent",
        "text": f"message {turn}",
        "timestamp_ms": now_ms(),
        "customer": {"name": "Dana", "mood": "angry", "product": "laptop"},
        "agent": {"name": "Sam"},
        "model": "test",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "latency_ms": 100,
        "final": False,
        "end_reason": None,
    }
    message.update(overrides)
    return message


def scored_message(conversation_id: str, turn: int, score: float, **overrides) -> dict:
    """A valid `chat-scored` message as the aggregator receives it (validated, then dumped).

    Its sentiment label follows the score: positive above 0.3, negative below -0.3.
    """
    message = chat_message(conversation_id, turn=turn)
    message["sentiment"] = {
        "label": "positive" if score > 0.3 else "negative" if score < -0.3 else "neutral",
        "score": score,
        "model": "test",
    }
    message.update(overrides)
    return ScoredMessage.model_validate(message).model_dump(mode="json")


class ServiceProcess:
    """A service run as a real process (python <service>/main.py) with its log in a file."""

    def __init__(
        self, name: str, env: dict[str, str], log_dir: Path, argv: list[str] | None = None
    ):
        self.name = name
        self.env = env
        self.log_path = log_dir / f"{name}-{new_id()[:8]}.log"
        self.argv = argv or [os.environ.get("PYTHON", "python"), str(REPO_ROOT / name / "main.py")]
        self.process: subprocess.Popen | None = None

    def start(self) -> ServiceProcess:
        """Start the process."""
        import sys

        argv = [sys.executable if a == "python" else a for a in self.argv]
        self.process = spawn(argv, self.log_path, self.env)
        return self

    def kill(self) -> None:
        """SIGKILL the process (and its group), as a crash would."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL after a timeout)."""
        if self.process is not None:
            stop_process(self.process)

    def alive(self) -> bool:
        """True while running."""
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def transcripts(messages: list[dict]) -> dict[str, list[dict]]:
    """Messages grouped by conversation, each in turn order, deduplicated on message_id.

    message_id is the idempotency key (one per turn): a consumer that keeps the first copy of
    each sees exactly one message per turn even where the broker redelivers a record.
    """
    grouped: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for m in messages:
        if m["message_id"] in seen:
            continue
        seen.add(m["message_id"])
        grouped.setdefault(m["conversation_id"], []).append(m)
    return {cid: sorted(ms, key=lambda m: m["turn"]) for cid, ms in grouped.items()}


def transcript_problems(conversation: list[dict]) -> list[str]:
    """What is wrong with one conversation's messages (empty when it is whole and consistent)."""
    problems = []
    turns = [m["turn"] for m in conversation]
    if turns != list(range(len(turns))):
        problems.append(f"turns not consecutive from 0: {turns}")
    roles = [m["role"] for m in conversation]
    expected = ["agent" if t % 2 == 0 else "customer" for t in range(len(roles))]
    if roles != expected:
        problems.append(f"roles do not alternate: {roles}")
    if len({json.dumps([m["customer"], m["agent"]], sort_keys=True) for m in conversation}) > 1:
        problems.append("persona changed during the conversation")
    finals = [m["turn"] for m in conversation if m["final"]]
    if finals and finals != [turns[-1]]:
        problems.append(f"final flag on turns {finals}, last turn {turns[-1]}")
    if finals and not conversation[-1]["end_reason"]:
        problems.append("final message without end_reason")
    if len({m["message_id"] for m in conversation}) != len(conversation):
        problems.append("duplicate message_id")
    return problems


def finished(conversation: list[dict]) -> bool:
    """True when the conversation's last message is final."""
    return bool(conversation) and conversation[-1]["final"]
