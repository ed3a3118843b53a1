"""The openai backend against a real OpenAI-compatible server: llama-cpp-python's own server.

`llama_cpp.server` serves the small SmolLM2 model on a free port for this module. A whole
conversation runs through it via Kafka; a server that answers 500 or is down ends a conversation
with `error` after the client's retries (never silently); a refused API key is one clear error.
"""

from __future__ import annotations

import http.server
import logging
import os
import sys
import threading
import time

import httpx
import pytest

from supportsim.bots.conversation import BotConfig, handle, opening_message
from supportsim.bots.llm import LLMConfig
from supportsim.bots.memory import chat_messages
from supportsim.bots.models import resolve_model
from supportsim.bots.prompts import Scenario
from supportsim.bots.server import ServerAuthError, ServerChatLLM
from supportsim.bots.turns import LLMResponder, generate_turn
from supportsim.contract.messages import ChatMessage
from supportsim.local.processes import free_port, spawn, stop_process
from tests.support import ServiceProcess, read_topic, transcript_problems, transcripts, values

pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] is not installed")

# a stand-in key for the test server, not a secret
SERVER_KEY = "dummy-test-server-key"
ALIAS = "smollm2-served"
SERVER_CTX = 1024


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory) -> str:
    """The base URL of llama_cpp.server serving SmolLM2 with an API key."""
    port = free_port()
    log = tmp_path_factory.mktemp("llm-server") / "server.log"
    argv = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(resolve_model("smollm2-135m").path),
        "--model_alias",
        ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(SERVER_CTX),
        "--n_threads",
        "1",
        "--api_key",
        SERVER_KEY,
    ]
    process = spawn(argv, log, dict(os.environ))
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert process.poll() is None, log.read_text()
            try:
                headers = {"Authorization": f"Bearer {SERVER_KEY}"}
                if httpx.get(f"{base_url}/models", headers=headers, timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "llama_cpp.server did not start: " + log.read_text()
            time.sleep(0.5)
        yield base_url
    finally:
        stop_process(process)


@pytest.fixture
def failing_server():
    """A real HTTP server that answers every request with 500, counting the requests."""
    hits: list[str] = []

    class Failing(http.server.BaseHTTPRequestHandler):
        def _fail(self) -> None:
            hits.append(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            body = b'{"error": {"message": "model crashed", "type": "server_error"}}'
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _fail

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", hits
    server.shutdown()


def server_config(base_url: str, **overrides) -> LLMConfig:
    settings = {
        "backend": "openai",
        "base_url": base_url,
        "api_key": SERVER_KEY,
        "n_ctx": SERVER_CTX,
        "max_tokens": 48,
        "seed": 5,
        "request_retries": 2,
        **overrides,
    }
    return LLMConfig(**settings)


def greeting(scenario: Scenario) -> ChatMessage:
    return opening_message("00000000-0000-4000-8000-00000000a11a", scenario)


def test_the_server_backend_asks_the_servers_only_model_and_reads_its_usage(llm_server):
    llm = ServerChatLLM.connect(server_config(llm_server))
    assert llm.model_name == ALIAS  # LLM_MODEL unset: the one model the server lists
    messages = chat_messages(
        "You are a terse assistant.", [{"role": "customer", "text": "Name a colour."}], "agent"
    )
    reply = llm.reply(messages)
    assert reply.text
    assert 0 < reply.completion_tokens <= 48
    # the estimate used for trimming errs on the long side of the server's own count
    assert llm.count_tokens(messages) >= reply.prompt_tokens > 0


def test_history_is_trimmed_to_the_configured_context_of_the_server(llm_server):
    llm = ServerChatLLM.connect(server_config(llm_server))
    scenario = Scenario.load("electronics")
    persona = scenario.draw_persona(__import__("random").Random(3))
    line = "My order number is 88123 and the charger still does not work after three tries. "
    history = [{"role": "agent" if i % 2 == 0 else "customer", "text": line * 4} for i in range(41)]
    reply = generate_turn(llm, scenario, persona, "agent", history)
    # a prompt beyond the server's context would be refused; this one fits with the reply
    assert reply.text and reply.prompt_tokens <= SERVER_CTX - llm.config.max_tokens


def test_a_refused_api_key_is_one_clear_error(llm_server):
    with pytest.raises(ServerAuthError) as refused:
        ServerChatLLM.connect(server_config(llm_server, api_key="dummy-wrong-key"))
    message = str(refused.value)
    assert "refused the API key" in message and "LLM_API_KEY" in message
    assert "dummy-wrong-key" not in message


def test_a_bot_with_a_refused_key_exits_with_one_error_line(llm_server, service_env, tmp_path):
    env = {
        **service_env,
        "LLM_BACKEND": "openai",
        "LLM_BASE_URL": llm_server,
        "LLM_API_KEY": "dummy-wrong-key",
    }
    bot = ServiceProcess("ai_support_agent", env, tmp_path).start()
    assert bot.process.wait(60) == 2
    log = bot.log()
    assert log.count("refused the API key") == 1, log
    assert "Traceback" not in log and "dummy-wrong-key" not in log


@pytest.mark.parametrize("server", ["answers 500", "is down"])
def test_a_failing_server_ends_the_conversation_with_error_after_retries(
    server, failing_server, caplog
):
    base_url, hits = failing_server
    if server == "is down":
        base_url = f"http://127.0.0.1:{free_port()}/v1"
    scenario = Scenario.load("electronics")
    responder = LLMResponder(ServerChatLLM.connect(server_config(base_url)), scenario)
    hello = greeting(scenario)
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        outcome = handle(None, hello, BotConfig(role="customer"), responder, scenario)
    reply = outcome.messages[0]
    assert (reply.final, reply.end_reason) == (True, "error")
    assert "the customer bot failed" in reply.text
    # the log names the server's answer
    reason = "Error code: 500 - model crashed" if server == "answers 500" else "Connection error"
    assert "bot failed" in caplog.text and reason in caplog.text
    if server == "answers 500":
        # the first request and its two retries (free-text turns: no response-format check)
        assert hits.count("/v1/chat/completions") == 3
    assert time.monotonic() - started > 0.5  # the retries waited (backoff), not spun


def test_a_whole_conversation_runs_through_the_server(llm_server, service_env, broker, tmp_path):
    env = {
        **service_env,
        "BOT_MODE": "llm",
        "LLM_BACKEND": "openai",
        "LLM_BASE_URL": llm_server,
        "LLM_API_KEY": SERVER_KEY,
        "LLM_N_CTX": str(SERVER_CTX),
        "LLM_MAX_TOKENS": "48",
        "MAX_TURNS": "5",
        "CONVERSATIONS": "2",
        # two workers in the agent replica: two turns in flight against the server
        "LLM_CONCURRENCY": "2",
        # structured turns through the server's response format
        "LLM_STRUCTURED": "true",
    }
    starter = ServiceProcess("conversation_starter", env, tmp_path).start()
    assert starter.process.wait(120) == 0, starter.log()
    bots = [
        ServiceProcess(name, env, tmp_path).start() for name in ("ai_customer", "ai_support_agent")
    ]
    try:
        records = read_topic(
            broker,
            env["CHAT_TOPIC"],
            until=lambda r: sum(1 for c in transcripts(values(r)).values() if c[-1]["final"]) >= 2,
            timeout=300,
        )
    finally:
        for bot in bots:
            bot.stop()
    logs = [bot.log()[-3000:] for bot in bots]
    finished = [c for c in transcripts(values(records)).values() if c[-1]["final"]]
    assert len(finished) >= 2, logs
    for conversation in finished[:2]:
        assert transcript_problems(conversation) == [], conversation
        replies = conversation[1:]
        assert all(m["model"] == ALIAS for m in replies), logs
        assert all(m["prompt_tokens"] > 0 and m["completion_tokens"] > 0 for m in replies)
        assert (
            conversation[-1]["end_reason"] != "error"
            or "EmptyReplyError" in (conversation[-1]["text"])
        ), conversation[-1]
        # structured turns through the server's response format: the ending carries an outcome
        if conversation[-1]["end_reason"] not in ("error", "loop"):
            assert conversation[-1]["outcome"] in ("resolved", "unresolved", "gave_up")
            assert not any(m["text"].lstrip().startswith('{"') for m in replies)
