"""`supportsim up` and a Redis it did not start (the real one): it deletes only its own keys.

The embedded broker starts empty, so `up` removes what an earlier `up` left in Redis; it must
never remove keys that something else wrote there, nor those of an `up` still running.
"""

import json
import os
import socket
import subprocess

import pytest

from supportsim.local.processes import StackError
from supportsim.local.stack import UP_RUN_KEY, Stack


@pytest.fixture
def stack(redis_url, prefix, monkeypatch, tmp_path):
    monkeypatch.setenv("REDIS_KEY_PREFIX", prefix)
    instance = Stack(tmp_path / "run", redis_url=redis_url, services=[], say=lambda _: None)
    instance.redis.start()
    assert not instance.redis.started_here, "these tests need a Redis that answers at REDIS_URL"
    return instance


def test_keys_that_up_did_not_write_are_left_alone_and_the_start_stops(stack, redis_client, prefix):
    redis_client.set(f"{prefix}fleet", "written by a docker compose run")
    with pytest.raises(StackError, match="did not write"):
        stack.clear_earlier_run()
    assert redis_client.get(f"{prefix}fleet") == "written by a docker compose run"


def test_keys_of_an_earlier_up_are_removed(stack, redis_client, prefix):
    stack.clear_earlier_run()  # marks the prefix as up's
    redis_client.set(f"{prefix}fleet", "from the earlier run")
    stack.clear_earlier_run()
    assert redis_client.get(f"{prefix}fleet") is None
    assert redis_client.exists(f"{prefix}{UP_RUN_KEY}")


def test_keys_of_an_up_still_running_are_left_alone(stack, redis_client, prefix):
    other = subprocess.Popen(["sleep", "60"])  # stands in for another `up` process
    try:
        owner = {"host": socket.gethostname(), "pid": other.pid, "run_dir": "runs/other"}
        redis_client.set(f"{prefix}{UP_RUN_KEY}", json.dumps(owner))
        redis_client.set(f"{prefix}fleet", "live")
        with pytest.raises(StackError, match=f"pid {other.pid}"):
            stack.clear_earlier_run()
        assert redis_client.get(f"{prefix}fleet") == "live"
    finally:
        other.kill()
        other.wait()
    assert other.pid != os.getpid()
