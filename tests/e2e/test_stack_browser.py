"""The whole embedded stack with the real LLM bots, seen through a real headless Chromium."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import redis

from supportsim.contract.messages import new_id
from supportsim.contract.redis_keys import clear_prefix
from tests.e2e.browser import open_page, require_browser, screenshot, text_content


def test_dashboard_shows_a_conversation_the_bots_produced(tmp_path, redis_url, sentiment_model):
    require_browser()
    prefix = f"t{new_id()[:8]}-e2e:"
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": prefix,
        "LLM_MAX_TOKENS": "48",
        "MAX_TURNS": "6",
        "SUPPORTSIM_PROGRESS_EVERY": "5",
    }
    stack = subprocess.Popen(
        [
            *(sys.executable, "-m", "supportsim.cli", "up"),
            *("--run-dir", str(tmp_path / "run"), "--bots", "llm", "--model", "smollm2-135m"),
            *("--conversations", "2", "--replicas", "ai_customer=1"),
            *("--replicas", "ai_support_agent=1"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    lines: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            line = stack.stdout.readline()
            assert line, "supportsim up exited:\n" + "".join(lines)
            lines.append(line)
            match = re.search(r"dashboard: (http://127\.0\.0\.1:\d+)", line)
            url = match.group(1) if match else None
        assert url, "".join(lines)

        # a conversation written by the bots (through sentiment and the aggregator) to Redis
        names: set[str] = set()
        deadline = time.monotonic() + 300
        while not names and time.monotonic() < deadline:
            for key in client.scan_iter(f"{prefix}conversation:*"):
                record = json.loads(client.get(key) or "{}")
                if record.get("messages", 0) >= 2:
                    names.add(record["customer"]["name"])
            time.sleep(2)
        assert names, "no conversation reached Redis; see the run folder logs"

        with open_page(url, wait_for="Open a conversation") as page:
            deadline = time.monotonic() + 60
            while not any(n in text_content(page) for n in names):
                assert time.monotonic() < deadline, f"none of {names} shown on the page"
                time.sleep(1)
            shot = screenshot(page, "stack-dashboard")
        assert shot.exists() and shot.stat().st_size > 10_000
    finally:
        stack.send_signal(signal.SIGTERM)
        output, _ = stack.communicate(timeout=120)
        clear_prefix(client, prefix)
    assert stack.returncode == 0, "".join(lines) + output
