"""CONTRACT test of the InfluxDB sink: it stands in for a real InfluxDB 3, which cannot run here.

A local HTTP endpoint (`http.server` in a thread) plays InfluxDB 3's write API and records every
request it gets. The real `influx_sink` service runs as a process against the real broker:
scored messages go to the scored topic, and the test checks the line protocol that arrives
(escaping of spaces, commas, equals signs, quotes, backslashes and newlines in text and tag
values), batching, a retry after a 5xx, and that no message is lost. The stand-in does not
speak Flight SQL, so its /ping does not claim version 3 (the sink then skips its query check).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from quixstreams.sinks.base import SinkBackpressureError

from supportsim.contract.messages import new_id, now_ms
from supportsim.kafka.app import make_app
from supportsim.local.processes import REPO_ROOT, free_port
from supportsim.settings import ServiceSettings
from supportsim.sinks.influx import (
    HistorySettings,
    HistorySink,
    decode_text,
    encode_text,
    history_point,
    influx_configured,
    tag_value,
)
from tests.support import ServiceProcess, chat_message, produce, produce_json, read_topic, values

BATCH_SIZE = 25
NASTY_TEXTS = [
    "plain text",
    'she said "it broke", then left',
    "a\\b and a trailing backslash\\",
    "two\nlines\r\nand a tab\there",
    "key=value, spaces  and , commas",
    'mixed \\" escaped quote and \\\\ double',
    "unicode: ça marche ✓ 🚀",
]
NASTY_PERSONAS = [
    ({"name": "Zoë", "mood": "very angry, really", "product": 'phone "pro" = best'}, "Dr. Who"),
    ({"name": "Al", "mood": "calm", "product": "router\nmodel\\x"}, "agent, the\\first"),
    ({"name": "Bo", "mood": "sad ", "product": "laptop"}, "Sam=Smith"),
]


# --------------------------------------------------------------------------- the stand-in


class InfluxStandIn:
    """Records InfluxDB write requests; answers 503 to the first `failures` of them."""

    def __init__(self, failures: int = 0):
        self.requests: list[dict] = []
        self.failures = failures
        self.pings: list[dict] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                stand_in.pings.append(dict(self.headers))
                self.send_response(204)
                self.send_header("X-Influxdb-Version", "contract-stand-in")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                status = 503 if stand_in.failures > 0 else 204
                stand_in.failures -= status == 503
                stand_in.requests.append(
                    {
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": body.decode("utf-8"),
                        "status": status,
                    }
                )
                payload = b'{"code":"unavailable","message":"stand-in is busy"}'
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload) if status >= 500 else 0))
                self.end_headers()
                if status >= 500:
                    self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The host URL the sink is given."""
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> InfluxStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def points(self, status: int = 204) -> list[dict]:
        """Every point in the requests answered with `status`, parsed."""
        return [
            parse_line(line)
            for request in self.requests
            if request["status"] == status
            for line in request["body"].split("\n")
            if line
        ]


# --------------------------------------------------------------------------- line protocol


def _split(text: str, separators: str) -> tuple[str, str, str]:
    """Up to the first unescaped separator (outside double quotes): (head, separator, rest)."""
    quoted = False
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif not quoted and char in separators:
            return text[:index], char, text[index + 1 :]
        index += 1
    return text, "", ""


def _unescape_key(text: str) -> str:
    """Measurement, tag key, tag value or field key: `\\,` `\\=` `\\ ` are escapes."""
    return re.sub(r"\\([,= ])", r"\1", text)


def _field_value(text: str) -> object:
    if text.startswith('"'):
        assert text.endswith('"') and len(text) >= 2, text
        return re.sub(r'\\(["\\])', r"\1", text[1:-1])
    if text in ("true", "false"):
        return text == "true"
    if text.endswith("i"):
        return int(text[:-1])
    return float(text)


def parse_line(line: str) -> dict:
    """Parse one line of InfluxDB line protocol, independently of the client that wrote it."""
    key, separator, rest = _split(line, " ")
    assert separator == " ", f"no field set in {line!r}"
    measurement, separator, tag_text = _split(key, ",")
    tags = {}
    while separator:
        pair, separator, tag_text = _split(tag_text, ",")
        tag_key, equals, tag_value_text = _split(pair, "=")
        assert equals == "=", f"bad tag {pair!r} in {line!r}"
        tags[_unescape_key(tag_key)] = _unescape_key(tag_value_text)
    field_text, separator, time_text = _split(rest, " ")
    fields = {}
    while field_text:
        pair, _, field_text = _split(field_text, ",")
        field_key, equals, value = _split(pair, "=")
        assert equals == "=", f"bad field {pair!r} in {line!r}"
        fields[_unescape_key(field_key)] = _field_value(value)
    assert time_text.isdigit(), f"bad time {time_text!r} in {line!r}"
    return {
        "measurement": _unescape_key(measurement),
        "tags": tags,
        "fields": fields,
        "time": int(time_text),
    }


# --------------------------------------------------------------------------- messages


def scored_messages(count: int) -> list[dict]:
    """Scored messages with awkward text and persona values, several per conversation."""
    messages = []
    conversations = [new_id() for _ in range(6)]
    start = now_ms()
    for index in range(count):
        persona, agent = NASTY_PERSONAS[index % len(NASTY_PERSONAS)]
        cid = conversations[index % len(conversations)]
        turn = index // len(conversations)
        final = index >= count - len(conversations)
        message = chat_message(
            cid,
            turn=turn,
            text=NASTY_TEXTS[index % len(NASTY_TEXTS)],
            timestamp_ms=start + index,
            customer=persona,
            agent={"name": agent},
            final=final,
            end_reason="goodbye" if final else None,
            prompt_tokens=index,
            completion_tokens=2 * index,
            latency_ms=10 * index,
        )
        message["sentiment"] = {"label": "neutral", "score": (index % 21 - 10) / 10, "model": "m"}
        messages.append(message)
    return messages


# --------------------------------------------------------------------------- tests


def test_text_and_tag_values_are_made_safe_for_line_protocol():
    for text in NASTY_TEXTS:
        stored = encode_text(text)
        assert "\n" not in stored and "\r" not in stored
        assert decode_text(stored) == text
    assert decode_text(encode_text("\\n is not a newline")) == "\\n is not a newline"
    assert tag_value("router\nmodel\\x\t") == "router model/x "
    assert tag_value('a, b = "c"') == 'a, b = "c"'  # the client escapes these


def test_a_point_has_the_documented_tags_fields_and_time():
    message = scored_messages(20)[0]
    point = history_point(message)
    assert point["conversation_id"] == message["conversation_id"]
    assert point["customer_mood"] == "very angry, really"
    assert point["agent_name"] == "Dr. Who"
    assert point["sentiment_score"] == -1.0 and isinstance(point["sentiment_score"], float)
    assert point["timestamp_ms"] == message["timestamp_ms"]
    assert "end_reason" not in point
    with pytest.raises(ValueError, match="timestamp_ms"):
        history_point({**message, "timestamp_ms": 5})


def test_influx_is_configured_only_with_host_database_and_token(monkeypatch):
    for name in ("INFLUXDB_HOST", "INFLUXDB_DATABASE", "INFLUXDB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    reason = influx_configured({})
    assert reason == (
        "InfluxDB is not configured (set INFLUXDB_HOST, INFLUXDB_DATABASE, INFLUXDB_TOKEN)"
    )
    assert "INFLUXDB_TOKEN" in influx_configured({"INFLUXDB_HOST": "h", "INFLUXDB_DATABASE": "d"})
    full = {"INFLUXDB_HOST": "http://h:8181", "INFLUXDB_DATABASE": "d", "INFLUXDB_TOKEN": "t"}
    assert influx_configured(full) is None
    settings = HistorySettings()
    assert settings.influxdb_measurement == "chat_messages" and settings.influxdb_token is None
    monkeypatch.setenv("INFLUXDB_TOKEN", "very-secret")
    assert "very-secret" not in repr(HistorySettings())


def test_an_unreachable_influx_is_backpressure_not_a_crash(monkeypatch):
    monkeypatch.setenv("INFLUXDB_HOST", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("INFLUXDB_DATABASE", "history")
    monkeypatch.setenv("INFLUXDB_TOKEN", "t")
    sink = HistorySink(HistorySettings())
    sink.start()  # the connection check fails: logged, not fatal
    for attempt in (1.0, 2.0):
        sink.add(history_point(scored_messages(20)[0]), b"k", 0, [], "t", 0, 0)
        with pytest.raises(SinkBackpressureError) as raised:
            sink.flush()
        assert raised.value.retry_after == attempt


def test_the_sink_does_not_start_without_influx_and_says_why_in_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFLUXDB_")}
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "influx_sink" / "main.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "InfluxDB is not configured" in lines[0]


def test_the_real_sink_writes_every_message_as_correct_line_protocol_through_the_broker(
    service_env, broker, tmp_path
):
    settings = ServiceSettings()
    make_app(settings, group="topics", exactly_once=False)
    token = f"token-{new_id()}"
    messages = scored_messages(120)
    bad_time = {**scored_messages(20)[0], "message_id": new_id(), "timestamp_ms": 5}
    with InfluxStandIn(failures=1) as influx:
        env = {
            **service_env,
            "INFLUXDB_HOST": influx.url,
            "INFLUXDB_DATABASE": "history",
            "INFLUXDB_TOKEN": token,
            "INFLUXDB_MEASUREMENT": "chat_history",
            "INFLUXDB_BATCH_SIZE": str(BATCH_SIZE),
        }
        produce_json(broker, settings.scored_topic, messages[:60] + [bad_time])
        produce(broker, settings.scored_topic, [(b"k", b"{not json")])
        produce_json(broker, settings.scored_topic, messages[60:])
        service = ServiceProcess("influx_sink", env, tmp_path).start()
        try:
            deadline = time.monotonic() + 90
            wanted = {m["message_id"] for m in messages}
            while time.monotonic() < deadline:
                if wanted <= {p["fields"]["message_id"] for p in influx.points()}:
                    break
                assert service.alive(), service.log()[-3000:]
                time.sleep(0.3)
            log = service.log()
            assert service.alive(), log[-3000:]
        finally:
            service.stop()
        log = service.log()

    points = influx.points()
    by_id: dict[str, list[dict]] = {}
    for point in points:
        by_id.setdefault(point["fields"]["message_id"], []).append(point)
    assert set(by_id) == wanted, f"missing {len(wanted - set(by_id))}; log:\n{log[-3000:]}"
    # a message written twice (after the retry) is the same point: InfluxDB keeps one
    assert all(all(p == copies[0] for p in copies) for copies in by_id.values())

    for message in messages:
        point = by_id[message["message_id"]][0]
        persona = message["customer"]
        assert point["measurement"] == "chat_history"
        assert point["time"] == message["timestamp_ms"]
        assert point["tags"] == {
            "conversation_id": message["conversation_id"],
            "role": message["role"],
            "customer_mood": tag_value(persona["mood"]),
            "product": tag_value(persona["product"]),
            "agent_name": tag_value(message["agent"]["name"]),
        }
        expected_fields = {
            "text": encode_text(message["text"]),
            "sentiment_label": "neutral",
            "sentiment_score": message["sentiment"]["score"],
            "sentiment_model": "m",
            "turn": message["turn"],
            "message_id": message["message_id"],
            "customer_name": persona["name"],
            "model": "test",
            "prompt_tokens": message["prompt_tokens"],
            "completion_tokens": message["completion_tokens"],
            "latency_ms": message["latency_ms"],
            "final": message["final"],
        }
        if message["final"]:
            expected_fields["end_reason"] = "goodbye"
        assert point["fields"] == expected_fields
        assert decode_text(point["fields"]["text"]) == message["text"]
    # values with spaces, commas and equals signs arrive exactly; only control characters and
    # backslashes in tags are replaced
    assert any(p["tags"]["customer_mood"] == "very angry, really" for p in points)
    assert any(p["tags"]["product"] == 'phone "pro" = best' for p in points)
    assert any(p["tags"]["agent_name"] == "Sam=Smith" for p in points)
    assert any(p["tags"]["customer_mood"] == "sad " for p in points)

    failed = [r for r in influx.requests if r["status"] == 503]
    written = [r for r in influx.requests if r["status"] == 204]
    assert len(failed) == 1
    retried = {parse_line(line)["fields"]["message_id"] for line in failed[0]["body"].splitlines()}
    assert retried <= set(by_id)
    assert "InfluxDB unavailable (HTTP 503)" in log and "InfluxDB is back" in log
    # batching: many points per request, never more than the batch size
    sizes = [len(r["body"].splitlines()) for r in written]
    assert len(written) < len(messages) and max(sizes) > 1 and max(sizes) <= BATCH_SIZE
    for request in influx.requests:
        query = parse_qs(urlsplit(request["path"]).query)
        assert query["bucket"] == ["history"] and query["precision"] == ["ms"]
        assert request["headers"]["Authorization"] == f"Token {token}"
    assert token not in log

    def sources(records: list) -> set:
        return {(d["partition"], d["offset"]) for d in values(records)}

    # at-least-once: a retried checkpoint may dead-letter the same value again
    records = read_topic(broker, settings.dead_letter_topic, until=lambda r: len(sources(r)) >= 2)
    dead = list({(d["partition"], d["offset"]): d for d in values(records)}.values())
    errors = sorted(d["error"] for d in dead)
    assert len(dead) == 2 and all(d["service"] == "influx_sink" for d in dead), errors
    assert any("timestamp_ms 5 is not an epoch time" in e for e in errors)
    assert any("not JSON" in e for e in errors)
    assert json.loads(next(d for d in dead if "timestamp" in d["error"])["value"])["turn"] == 0
