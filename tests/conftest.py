"""Shared fixtures: one real Tansu broker per test session, real Redis, per-test isolation."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import redis

from supportsim.contract.messages import new_id
from supportsim.contract.redis_keys import clear_prefix
from supportsim.local.broker import LocalBroker, LocalRedis


@pytest.fixture(scope="session")
def session_dir():
    """A temporary folder for the whole test session (broker log, service logs)."""
    path = Path(tempfile.mkdtemp(prefix="supportsim-tests-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def local_broker(session_dir) -> LocalBroker:
    """A real Tansu broker started once for the session."""
    instance = LocalBroker(session_dir / "broker.log")
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture(scope="session")
def broker(local_broker) -> str:
    """Address of the session's broker."""
    return local_broker.address


@pytest.fixture(scope="session")
def redis_url(session_dir) -> str:
    """URL of a real Redis: the machine's on 6379 if it answers, else one started here."""
    instance = LocalRedis("redis://127.0.0.1:6379/0", session_dir / "redis.log")
    instance.start()
    yield instance.url
    instance.stop()


@pytest.fixture(scope="session")
def sentiment_model() -> Path:
    """The builtin sentiment model, trained into the cache first if it is not there yet.

    Trained once here, outside any test's time limit: on a new machine `supportsim up` (and a
    scoring service started by a test) would train it first, about a minute on two idle cores,
    and that minute would count against whichever test came first.
    """
    from supportsim.sentiment.model import ensure_builtin_model

    return ensure_builtin_model()


@pytest.fixture
def prefix() -> str:
    """A unique prefix isolating one test's topics, consumer groups and Redis keys."""
    return f"t{new_id()[:8]}-"


@pytest.fixture
def redis_client(redis_url, prefix):
    """A Redis client; the test's own keys (by prefix) are deleted afterwards."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    clear_prefix(client, prefix)


@pytest.fixture
def service_env(local_broker, redis_url, prefix, tmp_path, monkeypatch) -> dict[str, str]:
    """Environment for a service under test: isolated topics, group, state and Redis keys.

    Also applied to this process, so settings objects built in the test see the same values.
    """
    env = {
        **local_broker.client_env,  # as `supportsim up` runs its services
        "CHAT_TOPIC": f"{prefix}chat",
        "SCORED_TOPIC": f"{prefix}chat-scored",
        "DEAD_LETTER_TOPIC": f"{prefix}chat-dead-letters",
        "CONSUMER_GROUP_PREFIX": prefix,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": prefix,
        "STATE_DIR": str(tmp_path / "state"),
        "PYTHONUNBUFFERED": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def pids_alive():
    """Check which of some PIDs still run (zombies count as gone)."""

    def check(pids):
        alive = []
        for pid in pids:
            out = subprocess.run(
                ["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True
            )
            if out.stdout.strip() and not out.stdout.strip().startswith("Z"):
                alive.append(pid)
        return alive

    return check
