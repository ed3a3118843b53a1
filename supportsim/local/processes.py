"""Child processes of the local stack: ports, spawning, stopping whole process groups."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise StackError(f"process exited with code {process.returncode} before listening")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise StackError(f"nothing listens on port {port} after {timeout:.0f} s")


def spawn(
    argv: list[str], log_path: Path, env: dict[str, str] | None = None, nice: int = 0
) -> subprocess.Popen:
    """Start a process in its own process group, its output appended to `log_path`.

    `nice` lowers its CPU priority by that much (0: as ours), for work that may wait for cores.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            cwd=REPO_ROOT,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after `timeout`."""
    if process.poll() is not None:
        _kill_group(process.pid, signal.SIGKILL)  # a child it left behind, if any
        return
    _kill_group(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout)
    _kill_group(process.pid, signal.SIGKILL)
    process.wait()


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


REPO_ROOT = Path(__file__).resolve().parents[2]


class StackError(RuntimeError):
    """A piece the stack needs is missing; the message names the fix."""
