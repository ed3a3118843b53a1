"""`supportsim up`: starts, runs for --duration or until SIGTERM, and leaves nothing behind."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from supportsim.contract.messages import new_id
from supportsim.local.processes import free_port

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


def test_up_with_duration_exits_zero_and_leaves_no_process(
    tmp_path, redis_url, pids_alive, sentiment_model
):
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


def test_sigterm_stops_everything(tmp_path, redis_url, pids_alive, sentiment_model):
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


def test_own_redis_is_started_when_none_answers(tmp_path, pids_alive, sentiment_model):
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


def test_a_missing_sentiment_model_is_trained_before_any_service_starts(
    tmp_path, redis_url, pids_alive
):
    # a new machine: nothing in the model cache. Trained by the service on first use, the model
    # would compete with the bots for the cores and nothing would be scored for minutes
    cache = tmp_path / "cache"
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [*SUPPORTSIM, "up", "--duration", "3", "--run-dir", str(run_dir), *light_replicas()],
        env=up_env(redis_url, SUPPORTSIM_CACHE=str(cache), SENTIMENT_MODEL="builtin"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()

    def first(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    assert first("sentiment_analysis: training sentiment model") < first("epoch 1/5")
    ready = first("sentiment_analysis: sentiment model ready")
    assert ready < first("started 1 replica(s)"), "the model is ready before any service starts"
    assert [p.name for p in cache.glob("sentiment-minilm-*") if p.is_dir()], "trained into cache"
    service_log = (run_dir / "logs" / "sentiment_analysis-0.log").read_text()
    assert "first use" not in service_log, "the service did not train it again"
    assert pids_alive(started_pids(run_dir)) == []


def test_sigterm_while_the_sentiment_model_trains_stops_at_once(tmp_path, redis_url, pids_alive):
    cache = tmp_path / "cache"
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [*SUPPORTSIM, "up", "--run-dir", str(run_dir), *light_replicas()],
        env=up_env(redis_url, SUPPORTSIM_CACHE=str(cache), SENTIMENT_MODEL="builtin"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "training sentiment model" in line:
            break
    assert lines and "training sentiment model" in lines[-1], "".join(lines)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, "".join(lines) + output
    assert "stopped while preparing sentiment_analysis" in output
    assert not (run_dir / "processes.json").exists(), "no service was started"
    assert not [p for p in cache.glob("sentiment-minilm-*") if p.is_dir()], "no half model kept"
