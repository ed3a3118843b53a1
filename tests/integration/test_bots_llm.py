"""The two LLM bots through the real broker with the real small model (SmolLM2-135M)."""

import json
import time

import pytest

from tests.harness.readback import read_records
from tests.support import (
    ServiceProcess,
    finished,
    read_topic,
    transcript_problems,
    transcripts,
    values,
)


@pytest.fixture
def llm_env(service_env):
    return {
        **service_env,
        "BOT_MODE": "llm",
        "LLM_MODEL": "smollm2-135m",
        "LLM_MAX_TOKENS": "48",
        "LLM_N_THREADS": "1",
        "MAX_TURNS": "6",
        "CONVERSATIONS": "2",
    }


def seed(env, log_dir):
    job = ServiceProcess("conversation_starter", env, log_dir).start()
    assert job.process.wait(120) == 0, job.log()


def wait_for(broker, topic, condition, timeout):
    records = read_topic(
        broker, topic, until=lambda r: condition(transcripts(values(r))), timeout=timeout
    )
    return transcripts(values(records))


def bot_failed(conversation):
    """True when a conversation ended with a bot error other than the small model writing nothing.

    SmolLM2-135M sometimes writes an empty line twice in a row; the bot then ends the conversation
    with `error` (EmptyReplyError) by design. Any other error is a bug the test must catch.
    """
    last = conversation[-1]
    return last["end_reason"] == "error" and "EmptyReplyError" not in last["text"]


def start(names, env, log_dir):
    return [ServiceProcess(name, env, log_dir).start() for name in names]


def stop(processes):
    for process in processes:
        process.stop()


def test_llm_conversations_complete_with_separate_personas(llm_env, broker, tmp_path):
    seed(llm_env, tmp_path)
    bots = start(["ai_customer", "ai_support_agent"], llm_env, tmp_path)
    seeded = None
    try:
        convs = wait_for(
            broker,
            llm_env["CHAT_TOPIC"],
            lambda c: (
                sum(1 for m in c.values() if finished(m) and m[0]["model"] == "template") >= 2
            ),
            timeout=300,
        )
        seeded = [c for c in convs.values() if finished(c)]
    finally:
        stop(bots)
    assert seeded is not None and len(seeded) >= 2, [b.log()[-3000:] for b in bots]
    for conversation in seeded:
        assert transcript_problems(conversation) == []
        assert not bot_failed(conversation), conversation[-1]
        assert conversation[-1]["end_reason"] in {"goodbye", "turn_limit", "loop", "error"}
        replies = [m for m in conversation[1:] if m["end_reason"] != "error"]
        assert all(m["model"] != "template" and m["text"].strip() for m in replies)
        assert all(m["completion_tokens"] > 0 and m["latency_ms"] > 0 for m in replies)
        # every reply says how much of its prompt the model read (prompt reuse did the rest)
        assert all(0 < m["evaluated_prompt_tokens"] <= m["prompt_tokens"] for m in replies)
        assert not any(m["text"].lower().startswith(("agent:", "customer:")) for m in replies)
    # two conversations in the same two processes: each keeps its own persona
    personas = {(c[0]["customer"]["name"], c[0]["customer"]["product"]) for c in seeded[:2]}
    assert len(personas) == 2


def test_llm_replicas_killed_mid_conversation_lose_and_duplicate_nothing(llm_env, broker, tmp_path):
    env = {**llm_env, "MAX_TURNS": "6", "CONVERSATIONS": "3"}
    seed(env, tmp_path)
    bots = start(
        ["ai_customer", "ai_customer", "ai_support_agent", "ai_support_agent"], env, tmp_path
    )
    try:
        wait_for(broker, env["CHAT_TOPIC"], lambda c: sum(len(m) for m in c.values()) >= 7, 300)
        bots[0].kill()
        bots[2].kill()
        time.sleep(0.5)
        convs = wait_for(
            broker,
            env["CHAT_TOPIC"],
            lambda c: (
                sum(1 for m in c.values() if finished(m) and m[0]["model"] == "template") >= 4
            ),
            timeout=420,
        )
    finally:
        stop(bots)
    done = [c for c in convs.values() if finished(c)]
    assert len(done) >= 3, [b.log()[-3000:] for b in bots]
    for conversation in convs.values():
        assert transcript_problems(conversation) == []
    assert not [c[-1] for c in done if bot_failed(c)]


def test_a_failing_model_call_ends_the_conversation_with_error_and_it_is_replaced(
    llm_env, broker, tmp_path
):
    # a context window too small for the customer's system prompt: every customer call fails
    env = {**llm_env, "LLM_N_CTX": "256", "CONVERSATIONS": "2"}
    seed(env, tmp_path)
    bots = start(["ai_customer", "ai_support_agent"], env, tmp_path)
    try:
        wait_for(broker, env["CHAT_TOPIC"], lambda c: sum(map(finished, c.values())) >= 6, 240)
        assert all(b.alive() for b in bots), [b.log()[-3000:] for b in bots]
    finally:
        stop(bots)
    # after the clean stop, everything the bots wrote, read to the end of every partition
    records = read_records(broker, env["CHAT_TOPIC"])
    convs = transcripts([json.loads(r.value) for r in records if r.value])
    ended = [c for c in convs.values() if finished(c)]
    assert len(ended) >= 6
    for conversation in ended:
        assert transcript_problems(conversation) == []
        last = conversation[-1]
        assert (last["turn"], last["role"], last["end_reason"]) == (1, "customer", "error")
        assert "ContextBudgetError" in last["text"], last
    # each failed conversation was replaced at once: the target concurrency still holds
    assert sum(not finished(c) for c in convs.values()) == 2, convs
    assert "raise LLM_N_CTX or lower LLM_MAX_TOKENS" in bots[0].log()


def test_a_replica_whose_worker_dies_exits_so_it_is_restarted(service_env, tmp_path):
    env = {**service_env, "LLM_CONCURRENCY": "2", "LLM_MODEL": str(tmp_path / "missing.gguf")}
    replica = ServiceProcess("ai_customer", env, tmp_path).start()
    status = replica.process.wait(120)
    log = replica.log()
    assert status != 0, log
    assert "running 2 workers" in log and "worker exited with status" in log
    assert "missing.gguf" in log  # the worker's own error says why
