"""`supportsim up`: starts, runs for --duration or until SIGTERM, and leaves nothing behind."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from supportsim.messages import new_id
from supportsim.stack import free_port

SUPPORTSIM = [sys.executable, "-m", "supportsim.cli"]


def up_env(redis_url: str, **extra) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": f"t{new_id()[:8]}-up:",
        "SUPPORTSIM_PROGRESS_EVERY": "2",
        **extra,
    }


def started_pids(run_dir: Path) -> list[int]:
    table = json.loads((run_dir / "processes.json").read_text())
    pids = [table["broker"], table["redis"], *table["services"].values()]
    return [p for p in pids if p]


def light_replicas() -> list[str]:
    # no bots, and no one-shot starter job (it exits by design, so it is not "still running")
    return [
        *("--replicas", "ai_customer=0", "--replicas", "ai_support_agent=0"),
        *("--replicas", "conversation_starter=0"),
    ]


def test_up_with_duration_exits_zero_and_leaves_no_process(tmp_path, redis_url, pids_alive):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [*SUPPORTSIM, "up", "--duration", "20", "--run-dir", str(run_dir), *light_replicas()],
        env=up_env(redis_url),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broker: Tansu on 127.0.0.1:" in result.stdout
    assert "[up] services:" in result.stdout  # live progress lines
    assert "stopped" in result.stdout
    pids = started_pids(run_dir)
    assert pids, "the broker at least was started"
    assert pids_alive(pids) == []
    assert (run_dir / "logs" / "broker.log").exists()


def test_sigterm_stops_everything(tmp_path, redis_url, pids_alive):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [*SUPPORTSIM, "up", "--run-dir", str(run_dir), *light_replicas()],
        env=up_env(redis_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "processes.json").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)
    pids = started_pids(run_dir)
    assert pids_alive(pids) == pids, "everything runs before the signal"
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert pids_alive(pids) == []


def test_own_redis_is_started_when_none_answers(tmp_path, pids_alive):
    run_dir = tmp_path / "run"
    dead_url = f"redis://127.0.0.1:{free_port()}/0"
    result = subprocess.run(
        [*SUPPORTSIM, "up", "--duration", "3", "--run-dir", str(run_dir), *light_replicas()],
        env=up_env(dead_url),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(started here)" in result.stdout
    table = json.loads((run_dir / "processes.json").read_text())
    assert table["redis"] and pids_alive([table["redis"]]) == []


def test_missing_redis_gives_one_clear_line(tmp_path):
    dead_url = f"redis://127.0.0.1:{free_port()}/0"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = up_env(dead_url, PATH=str(bin_dir))
    result = subprocess.run(
        [*SUPPORTSIM, "up", "--duration", "3", "--run-dir", str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "redis-server" in result.stderr and "REDIS_URL" in result.stderr
    assert "Traceback" not in result.stderr
