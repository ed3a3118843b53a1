"""Benchmark: SIGKILL every service again and again; no conversation loses or doubles a message.

Starts the embedded stack (Tansu broker, Redis, sentiment_analysis, redis_aggregator,
ai_support_agent x2, ai_customer x2, conversation_starter; scripted bots, the real sentiment
model) in this process, then kills a random service process with SIGKILL every few seconds, each
service at least twice (the finished conversation_starter job is launched again and killed while
it seeds); the stack's supervisor restarts whatever died. Then the kills stop, every replica is
back, every conversation in progress must get a new turn (nothing stalled), the bots are stopped
and the rest drains, and `tests.harness.oracle.verify` checks, per conversation and per message_id:

- chat: turns consecutive from 0, roles alternating, one persona, final only on the last turn
  with an end_reason, the replacement of every ended conversation started, nothing else started;
- chat-scored: exactly the same messages as chat (first copies, field by field);
- Redis: the conversation value counts exactly those messages (count, last turn, status, end
  reason, score and token sums, recent message ids, active/ended set), and the fleet totals equal
  an independent recomputation from chat-scored.

Raw duplicates (the same message_id twice, from a transaction the broker shows although it was
aborted, then redone) are counted and printed; the checks compare first copies, as consumers do.

With `--poison` it runs the poison check instead (no kills): every kind of bad input
(`tests.harness.poisons.poison_catalogue`) goes into `chat` and into `chat-scored` while
conversations run; each record must reach the dead-letter topic with a reason from every service
that reads it (or, for a duplicate, be ignored, as the aggregator's log line shows), no replica
may restart or change PID, and the healthy conversations must verify exact as above.

Usage: .venv/bin/python bench/chaos.py [--quick] [--poison] [--seed N] [--keep]
Last line: RESULT chaos ratio=<conversations verified exact / started> target=1.0
kills=<service:n,...> messages=<checked> dead_letters=<n> duplicates_raw=<n> aggregates=exact|...
or, with --poison: RESULT poison ratio=<poison records handled / injected> target=1.0
restarts=<n> conversations_exact=<ratio> ...
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supportsim.settings import RedisSettings  # noqa: E402
from tests.harness import (
    chaos,  # noqa: E402
    oracle,  # noqa: E402
    poisons,  # noqa: E402
    runs,  # noqa: E402
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run (under 5 minutes)")
    parser.add_argument("--seed", type=int, default=None, help="random seed of the kill schedule")
    parser.add_argument("--duration", type=float, help="seconds of kills (default 100 / 600)")
    parser.add_argument("--conversations", type=int, help="concurrent conversations (8 / 16)")
    parser.add_argument("--keep", action="store_true", help="keep the run folder (logs)")
    parser.add_argument("--poison", action="store_true", help="inject bad input instead")
    args = parser.parse_args()
    if args.poison:
        return poison(args)

    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    duration = args.duration or (100.0 if args.quick else 600.0)
    config = runs.RunConfig(
        conversations=args.conversations or (8 if args.quick else 16),
        max_turns=8,
        think_time_s=0.15,
        goodbye_after=6,
    )
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)

    run_dir = Path(tempfile.mkdtemp(prefix="supportsim-chaos-"))
    redis_url = RedisSettings().redis_url.get_secret_value()
    say(f"seed {seed}; {config.conversations} conversations; {duration:.0f} s of kills")
    with runs.running_stack(run_dir, config, redis_url, say) as stack:
        if not runs.wait_for_flow(stack, config, config.conversations * 2, 180, say):
            say("the pipeline did not start: see the logs")
            print(f"RESULT chaos ratio=0 target=1.0 error=no_flow run_dir={run_dir}")
            return 1
        say("pipeline flowing; kills start")
        driver = chaos.KillDriver(stack, random.Random(seed), say=say)
        chaos.run_chaos(stack, driver, duration, interval_s=(3.0, 7.0), min_kills=2, say=say)
        say(f"kills stopped: {driver.summary()}; waiting for every replica")
        runs.supervise_for(stack, 180, say, until=lambda: runs.all_up(stack))
        runs.supervise_for(stack, 10, say)
        stalled = oracle.wait_for_progress(stack, 90, say=say)
        say(f"stalled conversations: {len(stalled)}; stopping the bots, draining")
        runs.stop_bots(stack)
        result, _ = oracle.drain_and_verify(stack, config, 120, say, stalled=stalled)
        restarts = sum(runs.restarts(stack).values())
    for line in result.lines():
        say(line)
    say(f"kills: {driver.summary()} ({len(driver.history)} in all); restarts: {restarts}")
    duplicates = sum(result.duplicates_raw.values())
    ok = result.ok and result.dead_letters == 0  # no bad input here: a dead letter is a fault
    if ok and not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        say(f"logs kept in {run_dir / 'logs'}")
    print(
        f"RESULT chaos ratio={result.ratio:.3f} target=1.0 kills={driver.summary()} "
        f"messages={result.messages} dead_letters={result.dead_letters} "
        f"duplicates_raw={duplicates} conversations={result.conversations} "
        f"aggregates={'exact' if result.aggregates_exact else 'mismatch'} seed={seed}"
    )
    return 0 if ok else 1


def poison(args: argparse.Namespace) -> int:
    """The poison run: bad input while conversations run, no kills."""
    config = runs.RunConfig(conversations=args.conversations or 6, max_turns=8, think_time_s=0.15)
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)

    run_dir = Path(tempfile.mkdtemp(prefix="supportsim-poison-"))
    redis_url = RedisSettings().redis_url.get_secret_value()
    with runs.running_stack(run_dir, config, redis_url, say) as stack:
        if not runs.wait_for_flow(stack, config, config.conversations * 3, 180, say):
            print(f"RESULT poison ratio=0 target=1.0 error=no_flow run_dir={run_dir}")
            return 1
        run = poisons.run_poison(stack, config, say)
    for line in run.lines():
        say(line)
    if run.ok and not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        say(f"logs kept in {run_dir / 'logs'}")
    result = run.verification
    print(
        f"RESULT poison ratio={run.handled / len(run.outcomes):.3f} target=1.0 "
        f"injected={len(run.outcomes)} restarts={sum(run.restarts.values())} "
        f"pids_unchanged={int(run.pids_before == run.pids_after)} "
        f"conversations_exact={result.ratio:.3f} conversations={result.conversations} "
        f"dead_letters={result.dead_letters} "
        f"aggregates={'exact' if result.aggregates_exact else 'mismatch'}"
    )
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
