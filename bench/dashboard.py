"""Benchmark: one full dashboard render with 1,000 conversations in Redis versus with 10.

The render includes the live wall (DASHBOARD_WALL_SIZE tiles, default 4, each with its latest
messages as chat bubbles); the run fails if the wall is not drawn.

Usage: `.venv/bin/python bench/dashboard.py [--quick]`

Writes its own fixture conversations to Redis (REDIS_URL, else a redis-server started here)
under a unique key prefix, deleted afterwards. Each render is Streamlit's AppTest running the
whole of dashboard/main.py with every cache emptied first, so all conversations are read from
Redis, parsed and drawn: the cost of opening the page. Also reported: the steady-state refresh
(`refresh_1000_s`), where only conversations that changed are read again.

The target: a render of 1,000 conversations finishes within the default refresh interval of
2 s, so the measured ratio is 2.0 / render_1000_s (>= 1.0 meets it). The last line is
`RESULT dashboard ratio=<2.0 / render_1000_s> target=1.0 render_10_s=... render_1000_s=...
wall_tiles=...`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import redis  # noqa: E402
import streamlit as st  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from supportsim.contract.messages import new_id, now_ms  # noqa: E402
from supportsim.contract.redis_keys import clear_prefix  # noqa: E402
from supportsim.live.sample import sample_conversation, sample_fleet, sample_series, write_sample  # noqa: E402
from supportsim.local.broker import LocalRedis  # noqa: E402
from supportsim.settings import RedisSettings  # noqa: E402

APP = str(REPO_ROOT / "dashboard" / "main.py")
REFRESH_S = 2.0
WALL_SIZE = 4
TEXT = (
    "I ordered the laptop three weeks ago, it arrived with a cracked screen and the charger "
    "does not fit. I have written to you twice already and nobody answered. What now? "
)


def fill(client: redis.Redis, prefix: str, count: int, turns: int) -> None:
    """Write `count` conversations (a third of them finished) plus fleet and series."""
    now = now_ms()
    documents = [
        sample_conversation(
            i,
            turns=turns,
            status="ended" if i % 3 == 2 else "active",
            end_reason="goodbye" if i % 3 == 2 else None,
            outcome="resolved" if i % 6 == 2 else None,
            started_ms=now - 600_000 + i * 50,
            texts=[TEXT] * turns,
        )
        for i in range(count)
    ]
    for start in range(0, count, 200):
        write_sample(client, prefix, documents[start : start + 200])
    write_sample(
        client, prefix, [], fleet=sample_fleet(documents), series=sample_series(now, buckets=360)
    )


def wall_tiles(app: AppTest) -> int:
    """How many wall tiles the last run drew."""
    return sum(1 for block in app.container if (block.key or "").startswith("wall-"))


def render(app: AppTest, *, cold: bool) -> float:
    """Seconds for one full run of the dashboard script (the wall included)."""
    st.cache_data.clear()
    if cold:
        st.cache_resource.clear()  # also forgets the store's rows: every conversation is read
    started = time.perf_counter()
    app.run()
    elapsed = time.perf_counter() - started
    if app.exception:
        raise RuntimeError(f"the dashboard failed: {[e.value for e in app.exception]}")
    if wall_tiles(app) != WALL_SIZE:
        raise RuntimeError(f"the wall has {wall_tiles(app)} tiles, not {WALL_SIZE}")
    return elapsed


def main() -> int:
    """Run the benchmark; print one line per size and the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (under a minute)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    turns = 12 if args.quick else 20
    logging.getLogger("streamlit").setLevel(logging.ERROR)

    workdir = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    local = LocalRedis(RedisSettings().redis_url.get_secret_value(), workdir / "redis.log")
    local.start()
    client = redis.Redis.from_url(local.url, decode_responses=True)
    base = f"bench-dashboard-{new_id()[:8]}:"
    sizes = {10: f"{base}10:", 1000: f"{base}1000:"}
    cold: dict[int, list[float]] = {size: [] for size in sizes}
    warm: dict[int, list[float]] = {size: [] for size in sizes}
    try:
        for size, prefix in sizes.items():
            fill(client, prefix, size, turns)
        os.environ["REDIS_URL"] = local.url
        os.environ["DASHBOARD_WALL_SIZE"] = str(WALL_SIZE)
        apps = {}
        for size, prefix in sizes.items():
            os.environ["REDIS_KEY_PREFIX"] = prefix
            apps[size] = AppTest.from_file(APP, default_timeout=120)
            render(apps[size], cold=True)  # warm-up: imports, component scan, first compile
        for _ in range(repeats):  # sizes interleaved, so machine noise hits both alike
            for size, prefix in sizes.items():
                os.environ["REDIS_KEY_PREFIX"] = prefix
                cold[size].append(render(apps[size], cold=True))
                warm[size].append(render(apps[size], cold=False))
    finally:
        for prefix in sizes.values():
            clear_prefix(client, prefix)
        local.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    render_10 = statistics.median(cold[10])
    render_1000 = statistics.median(cold[1000])
    refresh_1000 = statistics.median(warm[1000])
    for size in sizes:
        runs = ", ".join(f"{t:.3f}" for t in cold[size])
        print(
            f"{size:>5} conversations ({turns} turns each): full render "
            f"{statistics.median(cold[size]):.3f} s (runs {runs}), "
            f"refresh {statistics.median(warm[size]):.3f} s"
        )
    print(
        f"RESULT dashboard ratio={REFRESH_S / render_1000:.2f} target=1.0 "
        f"render_10_s={render_10:.3f} render_1000_s={render_1000:.3f} "
        f"refresh_1000_s={refresh_1000:.3f} slowdown_1000_vs_10={render_1000 / render_10:.2f} "
        f"wall_tiles={WALL_SIZE}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
