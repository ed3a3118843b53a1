"""Poison: every kind of bad input, in `chat` and in `chat-scored`, while conversations run.

Invalid JSON, a JSON array, wrong types, missing fields, an unknown role, a 1 MiB text, invalid
UTF-8, an empty value, a key that is not the conversation id, a turn for an unknown
conversation, an out-of-order turn and two duplicates of a message_id (same and other text) go
into each topic of the running pipeline (`tests.harness.poisons.poison_catalogue`). Every record
must
reach the dead-letter topic, with a reason, from every service that reads it (a duplicate must be
ignored instead, as the aggregator's log shows); no replica may crash or restart; the healthy
conversations must complete and verify exact against chat-scored and Redis.
"""

import pytest

from tests.harness import poisons, runs

pytestmark = pytest.mark.slow


def test_bad_input_is_dead_lettered_and_hurts_nothing(tmp_path, redis_url, prefix, sentiment_model):
    config = runs.RunConfig(
        conversations=4,
        max_turns=8,
        think_time_s=0.1,
        key_prefix=prefix,
        seed_namespace=f"{prefix}seeds",
    )
    lines: list[str] = []
    with runs.running_stack(tmp_path / "run", config, redis_url, lines.append) as stack:
        assert runs.wait_for_flow(stack, config, 12, 180, lines.append), "\n".join(lines)
        run = poisons.run_poison(stack, config, lines.append, timeout=60)
    report = "\n".join(lines + run.lines())

    kinds = {(o.poison.topic, o.poison.kind) for o in run.outcomes}
    assert len(kinds) == len(run.outcomes) == 26, report
    assert [o.line() for o in run.outcomes if not o.ok] == [], report
    for outcome in run.outcomes:
        if outcome.poison.kind == "huge_text_1mb" and outcome.poison.error is not None:
            assert "too large" in outcome.poison.error.lower(), report  # refused by size, or...
        elif outcome.poison.expect:  # ...dead-lettered by every reader, each with a reason
            assert set(outcome.dead_lettered_by) == outcome.poison.expect, report
            assert all(reason.strip() for reason in outcome.dead_lettered_by.values()), report
    assert not any(run.restarts.values()), report
    assert run.pids_before == run.pids_after and not run.down, report
    assert run.verification.ok, report
    assert run.verification.ended >= 1, report
