"""Chaos: SIGKILL every service of the running pipeline; nothing is lost, doubled or stuck.

The embedded stack (its own Tansu broker, Redis under a unique key prefix, scripted bots, the
real sentiment model) runs every pipeline service; a driver kills a random service process every
few seconds until each was killed, and the stack's supervisor restarts it. Then every replica
must come back, every conversation in progress must move on, and once the bots stop and the
rest drains, chat, chat-scored and Redis must agree per message_id for every conversation, with
the fleet totals equal to a recomputation from chat-scored. `bench/chaos.py` is the longer run.
"""

import random

import pytest

from tests.harness import chaos, oracle, runs

pytestmark = pytest.mark.slow


def test_killing_every_service_loses_doubles_and_stalls_nothing(
    tmp_path, redis_url, prefix, sentiment_model
):
    config = runs.RunConfig(
        conversations=4,
        max_turns=6,
        think_time_s=0.1,
        goodbye_after=4,
        key_prefix=prefix,
        seed_namespace=f"{prefix}seeds",
    )
    lines: list[str] = []
    with runs.running_stack(tmp_path / "run", config, redis_url, lines.append) as stack:
        assert runs.wait_for_flow(stack, config, 8, 180, lines.append), "\n".join(lines)
        driver = chaos.KillDriver(stack, random.Random(7), min_uptime_s=4.0, say=lines.append)
        chaos.run_chaos(
            stack, driver, 30, interval_s=(2.5, 4.0), min_kills=1, max_extra_s=60, say=lines.append
        )
        back = runs.supervise_for(stack, 120, lines.append, until=lambda: runs.all_up(stack))
        stalled = oracle.wait_for_progress(stack, 60, say=lines.append)
        runs.stop_bots(stack)
        result, _ = oracle.drain_and_verify(stack, config, 90, lines.append, stalled=stalled)
    report = "\n".join(lines + result.lines())

    assert min(driver.kills.values()) >= 1, report
    assert set(driver.kills) == set(runs.PIPELINE), report
    assert back, report
    assert result.ok, report
    assert result.dead_letters == 0, report  # no bad input went in: a dead letter is a fault
    assert result.ended >= config.conversations, report  # conversations ended and were replaced
