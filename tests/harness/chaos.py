"""Chaos, poison and load runs against the embedded stack: start it, break it, check it.

Used by `bench/chaos.py`, `bench/load.py` and the integration tests. The pieces:

- :func:`running_stack` starts broker, Redis and every pipeline service (scripted bots, no
  dashboard) with a unique Redis key prefix, and stops everything afterwards;
- :class:`KillDriver` SIGKILLs a random service process every few seconds (the stack's
  supervisor restarts it); :func:`stop_bots` ends the conversations' source so the rest drains;
- :func:`snapshot` reads `chat`, `chat-scored`, the dead letters and Redis, and :func:`verify`
  checks them against each other with its own recomputation of the aggregates;
- :func:`poison_catalogue`, :func:`inject` and :func:`poison_outcomes` feed every kind of bad
  input to the running system and find where each one went;
- :class:`LatencyWatcher` and :func:`service_rss` measure the load run.

Duplicates are expected, and counted, never hidden: the embedded Tansu broker does not filter
aborted transactions, so after a SIGKILL a half-done transaction's records can be visible *and*
be redone by the next owner. Every message_id is deterministic per (conversation, turn), so the
checks compare per message_id (first copy kept, as every consumer does) and report the raw
duplicate counts next to the exact ones.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass

from supportsim.local.stack import Replica, Stack
from tests.harness.runs import (
    PIPELINE,
    Say,
)

# --------------------------------------------------------------------------- the stack


# --------------------------------------------------------------------------- kills


@dataclass
class Kill:
    """One SIGKILL delivered to a service process."""

    at_s: float
    service: str
    replica: str
    pid: int


class KillDriver:
    """SIGKILLs service processes of a running stack, spreading kills evenly over services.

    Each call to :meth:`kill_one` picks, among services with a killable replica, one of those
    killed least so far, and kills one of its replicas that has been up for `min_uptime_s` (so
    it is at work, not starting). A job (the conversation starter) that already finished is
    launched again, as an operator re-running it would, and killed while it seeds.
    """

    def __init__(
        self,
        stack: Stack,
        rng: random.Random,
        services: tuple[str, ...] = PIPELINE,
        min_uptime_s: float = 5.0,
        say: Say = print,
    ):
        self.stack = stack
        self.rng = rng
        self.services = tuple(s for s in services if any(r.spec.name == s for r in stack.replicas))
        self.min_uptime_s = min_uptime_s
        self.say = say
        self.kills: Counter[str] = Counter({name: 0 for name in self.services})
        self.history: list[Kill] = []
        self.started = time.monotonic()
        self._first_seen: dict[int, float] = {}
        self._job_delay = 0.6

    def observe(self) -> None:
        """Note when each running process was first seen (its uptime starts there)."""
        now = time.monotonic()
        for replica in self.stack.replicas:
            if replica.alive():
                self._first_seen.setdefault(replica.process.pid, now)

    def killable(self) -> dict[str, list[Replica]]:
        """Replicas that may be killed now, per service."""
        self.observe()
        now = time.monotonic()
        found: dict[str, list[Replica]] = {}
        for replica in self.stack.replicas:
            name = replica.spec.name
            if name not in self.services:
                continue
            if replica.spec.job:
                ready = replica.finished and not replica.alive()
            else:
                ready = replica.alive() and (
                    now - self._first_seen[replica.process.pid] >= self.min_uptime_s
                )
            if ready:
                found.setdefault(name, []).append(replica)
        return found

    def kill_one(self) -> Kill | None:
        """Kill one process (see the class docstring); None when nothing is killable now."""
        candidates = self.killable()
        if not candidates:
            return None
        fewest = min(self.kills[name] for name in candidates)
        name = self.rng.choice(sorted(n for n in candidates if self.kills[n] == fewest))
        replica = self.rng.choice(candidates[name])
        if replica.spec.job:
            replica.finished = False
            replica.start()  # the job runs again; kill it while it seeds
            time.sleep(self._job_delay * self.rng.uniform(0.5, 1.0))
            if not replica.alive():
                self._job_delay /= 2  # it finished first: catch the next run earlier
                self.say(f"{replica.label} finished before its kill; trying again later")
                return None
        pid = replica.process.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # pid leads its own process group: ours alone
        replica.process.wait()
        kill = Kill(round(time.monotonic() - self.started, 1), name, replica.label, pid)
        self.kills[name] += 1
        self.history.append(kill)
        self.say(f"SIGKILL {replica.label} (pid {pid}); kills so far: {self.summary()}")
        return kill

    def summary(self) -> str:
        """Kills per service, as `name:n,name:n`."""
        return ",".join(f"{name}:{self.kills[name]}" for name in self.services)


def run_chaos(
    stack: Stack,
    driver: KillDriver,
    duration_s: float,
    interval_s: tuple[float, float] = (3.0, 7.0),
    min_kills: int = 2,
    max_extra_s: float = 120.0,
    say: Say = print,
) -> None:
    """Kill a random service every `interval_s` seconds for `duration_s`, supervising meanwhile.

    Goes on past `duration_s` (up to `max_extra_s`) until every service was killed `min_kills`
    times.
    """
    started = time.monotonic()
    next_kill = started + driver.rng.uniform(*interval_s)
    while True:
        for event in stack.supervise():
            say(event)
        now = time.monotonic()
        enough = min(driver.kills.values(), default=min_kills) >= min_kills
        if now - started >= duration_s and (enough or now - started >= duration_s + max_extra_s):
            return
        if now >= next_kill:
            driver.kill_one()
            next_kill = time.monotonic() + driver.rng.uniform(*interval_s)
        time.sleep(0.25)


# --------------------------------------------------------------------------- reading


# --------------------------------------------------------------------------- verification


# --------------------------------------------------------------------------- poison


# --------------------------------------------------------------------------- load
