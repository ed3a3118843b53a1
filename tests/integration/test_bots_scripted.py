"""The conversation protocol through the real broker, with scripted bots (fast, no LLM).

The same services, state and exactly-once processing as the LLM bots; only the text source
differs. The LLM versions of these checks are in test_bots_llm.py.
"""

import time

import pytest

from tests.support import (
    ServiceProcess,
    finished,
    read_topic,
    transcript_problems,
    transcripts,
    values,
)

SEEDS = 3


@pytest.fixture
def bot_env(service_env):
    return {
        **service_env,
        "BOT_MODE": "scripted",
        "MAX_TURNS": "6",
        "CONVERSATIONS": str(SEEDS),
        "SCRIPTED_THINK_TIME_S": "0.05",
    }


def run_job(name, env, log_dir):
    job = ServiceProcess(name, env, log_dir).start()
    assert job.process.wait(120) == 0, job.log()


def chat_until(broker, topic, condition, timeout=120):
    records = read_topic(
        broker, topic, until=lambda r: condition(transcripts(values(r))), timeout=timeout
    )
    return transcripts(values(records))


def test_seeded_conversations_complete_and_are_replaced(bot_env, broker, tmp_path):
    run_job("conversation_starter", bot_env, tmp_path)
    bots = [
        ServiceProcess("ai_customer", bot_env, tmp_path).start(),
        ServiceProcess("ai_support_agent", bot_env, tmp_path).start(),
    ]
    try:
        convs = chat_until(
            broker, bot_env["CHAT_TOPIC"], lambda c: sum(map(finished, c.values())) >= 2 * SEEDS
        )
    finally:
        for bot in bots:
            bot.stop()
    done = {cid: c for cid, c in convs.items() if finished(c)}
    assert len(done) >= 2 * SEEDS, [b.log()[-2000:] for b in bots]
    for conversation in done.values():
        assert transcript_problems(conversation) == []
        assert conversation[-1]["end_reason"] in {"goodbye", "turn_limit"}
    # each ended conversation is replaced, so the number in flight stays at the target
    open_now = [c for c in convs.values() if not finished(c)]
    assert len(open_now) <= SEEDS


def test_reseeding_does_not_multiply_conversations(bot_env, broker, tmp_path):
    run_job("conversation_starter", bot_env, tmp_path)
    run_job("conversation_starter", bot_env, tmp_path)
    records = read_topic(broker, bot_env["CHAT_TOPIC"], until=2 * SEEDS, timeout=30)
    assert len(transcripts(values(records))) == SEEDS


def test_killed_replicas_lose_and_duplicate_nothing(bot_env, broker, tmp_path):
    env = {**bot_env, "SCRIPTED_THINK_TIME_S": "0.3", "MAX_TURNS": "10"}
    run_job("conversation_starter", env, tmp_path)
    bots = [ServiceProcess(name, env, tmp_path).start() for name in ["ai_customer"] * 2]
    bots += [ServiceProcess(name, env, tmp_path).start() for name in ["ai_support_agent"] * 2]
    try:
        chat_until(broker, env["CHAT_TOPIC"], lambda c: sum(len(m) for m in c.values()) >= 8)
        bots[0].kill()  # one customer replica
        bots[2].kill()  # one agent replica
        time.sleep(1)
        convs = chat_until(
            broker, env["CHAT_TOPIC"], lambda c: sum(map(finished, c.values())) >= SEEDS, 180
        )
    finally:
        for bot in bots:
            bot.stop()
    seeded_done = [c for c in convs.values() if finished(c)]
    assert len(seeded_done) >= SEEDS, [b.log()[-3000:] for b in bots]
    for conversation in convs.values():
        assert transcript_problems(conversation) == []


def test_restarting_all_bots_neither_loses_nor_multiplies(bot_env, broker, tmp_path):
    # no conversation may end: without the commit wait a turn takes little more than the think
    # time, so a limit of 30 turns is reached within seconds
    env = {**bot_env, "SCRIPTED_THINK_TIME_S": "0.2", "MAX_TURNS": "10000"}
    env["SCRIPTED_GOODBYE_AFTER"] = "10000"
    run_job("conversation_starter", env, tmp_path)

    def start_all():
        return [
            ServiceProcess("ai_customer", env, tmp_path).start(),
            ServiceProcess("ai_support_agent", env, tmp_path).start(),
        ]

    bots = start_all()
    chat_until(broker, env["CHAT_TOPIC"], lambda c: sum(len(m) for m in c.values()) >= 6)
    for bot in bots:
        bot.stop()
    bots = start_all()
    try:
        convs = chat_until(
            broker,
            env["CHAT_TOPIC"],
            lambda c: len(c) >= SEEDS and min(len(m) for m in c.values()) >= 8,
        )
    finally:
        for bot in bots:
            bot.stop()
    assert len(convs) == SEEDS  # nothing ended, so nothing was replaced
    for conversation in convs.values():
        assert transcript_problems(conversation) == []
