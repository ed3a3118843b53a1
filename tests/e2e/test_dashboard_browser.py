"""The dashboard in a real headless Chromium, served by `streamlit run dashboard/main.py` as a
subprocess (stopped by PID), reading fixture data from real Redis under its own key prefix.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import redis

from supportsim.contract.messages import new_id, now_ms
from supportsim.contract.redis_keys import RedisKeys, clear_prefix
from supportsim.live.sample import sample_conversation, sample_fleet, sample_series, write_sample
from tests.e2e.browser import (
    open_page,
    require_browser,
    screenshot,
    serve_dashboard,
    wait_for_text,
)

SCRIPT = "<script>window.__pwned=1</script>"
IMAGE = '<img src=x onerror="window.__pwned=2">'
HOSTILE_TEXTS = [
    f"Hello {SCRIPT} my **laptop** will not boot",
    f"{IMAGE} Sorry to hear that! Which model is it?",
    "It is the Zenbook, and I want a refund :red[now]",
]

METRIC_JS = """label => {
  for (const m of document.querySelectorAll('[data-testid=stMetric]')) {
    const name = m.querySelector('[data-testid=stMetricLabel]');
    if (name && name.innerText.trim() === label)
      return m.querySelector('[data-testid=stMetricValue]').innerText.trim();
  }
  return null;
}"""


def metric(page, label: str) -> str | None:
    """The value a headline metric shows, found by its exact label."""
    return page.evaluate(METRIC_JS, label)


@pytest.fixture(scope="module")
def site(redis_url, tmp_path_factory):
    """A served dashboard over fixture data: (url, redis client, prefix, the open conversation)."""
    require_browser()
    prefix = f"t{new_id()[:8]}-"
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    now = now_ms()
    hostile = sample_conversation(0, turns=3, started_ms=now - 10_000, texts=HOSTILE_TEXTS)
    hostile["customer"]["name"] = "Dana <b>**bold**</b>"
    hostile["card"]["wants"] = f"a refund {IMAGE} :red[today]"
    others = [sample_conversation(i, started_ms=now - 300_000 + i * 1000) for i in range(1, 6)]
    others += [
        sample_conversation(i, status="ended", end_reason="goodbye", started_ms=now - 600_000)
        for i in range(6, 9)
    ]
    documents = [hostile, *others]
    write_sample(
        client, prefix, documents, fleet=sample_fleet(documents), series=sample_series(now)
    )
    env = {"REDIS_URL": redis_url, "REDIS_KEY_PREFIX": prefix, "DASHBOARD_REFRESH_S": "1"}
    log_dir = tmp_path_factory.mktemp("dashboard")
    try:
        with serve_dashboard(env, log_dir) as url:
            yield url, client, prefix, hostile, documents, log_dir
    finally:
        clear_prefix(client, prefix)


def test_page_shows_a_conversation_and_runs_no_model_text(site):
    url, _, _, hostile, _, _ = site
    with open_page(url, wait_for="Transcript") as page:
        for text in HOSTILE_TEXTS:
            wait_for_text(page, text)  # literal, markup and all
        assert page.evaluate("typeof window.__pwned") == "undefined"
        assert page.locator("img[src='x']").count() == 0
        assert not page.evaluate(
            "Array.from(document.scripts).some(s => s.textContent.includes('__pwned'))"
        )
        # the live view redraws every second: wait for each part rather than read one moment
        wait_for_text(page, hostile["customer"]["name"])  # persona and card, literally
        wait_for_text(page, f"Wants: {hostile['card']['wants']}")
        for heading in (
            "Active",
            "Finished",
            "Customer sentiment",
            "Scoring behind",
            "Live conversations",
            "Sentiment over time",
            "By mood",
            "Conversations",
        ):
            wait_for_text(page, heading)
        # the wall: four tiles side by side, customer and agent bubbles distinct
        tiles = page.locator("[class*='st-key-wall-']")
        tiles.first.wait_for(state="visible")
        assert tiles.count() == 4
        boxes = [tiles.nth(i).bounding_box() for i in range(4)]
        assert len({round(b["y"]) for b in boxes}) == 1  # one row
        assert boxes == sorted(boxes, key=lambda b: b["x"])
        tile = tile_of(page, hostile)
        assert tile.locator("[aria-label='Chat message from user']").count() == 2  # customer
        assert tile.locator("[aria-label='Chat message from assistant']").count() == 1
        path = screenshot(page, "dashboard")
        assert path.stat().st_size > 20_000
        assert page.problems == []


def tile_of(page, document):
    """The wall tile that shows `document` (found by the short id in its caption)."""
    return page.locator("[class*='st-key-wall-']").filter(has_text=document["conversation_id"][:8])


def test_a_new_message_appears_in_its_wall_tile_without_a_reload(site):
    url, client, prefix, _, documents, _ = site
    keys = RedisKeys(prefix)
    target = documents[5]  # on the wall, and not the open transcript's conversation
    with open_page(url, wait_for="Live conversations") as page:
        page.evaluate("window.__marker = 'same page'")
        tile = tile_of(page, target)
        tile.wait_for(state="visible", timeout=30_000)
        document = json.loads(client.get(keys.conversation(target["conversation_id"])))
        latest = {**document["recent"][-1], "turn": 6, "role": "customer", "message_id": new_id()}
        latest.update(text="Is anyone there? <i>Hello?</i>", timestamp_ms=now_ms(), score=-0.7)
        latest["label"] = "negative"
        document["recent"].append(latest)
        document.update(messages=7, last_turn=6, updated_ms=latest["timestamp_ms"])
        write_sample(client, prefix, [document])
        tile.get_by_text("Is anyone there? <i>Hello?</i>").wait_for(timeout=30_000)
        tile.get_by_text("negative -0.70").wait_for(timeout=30_000)
        assert page.evaluate("window.__marker") == "same page"
        assert page.problems == []


def test_live_refresh_without_reloading_the_page(site):
    url, client, prefix, hostile, documents, _ = site
    keys = RedisKeys(prefix)
    with open_page(url, wait_for=HOSTILE_TEXTS[-1]) as page:
        page.evaluate("window.__marker = 'same page'")
        # the headline row is its own fragment: it may still be drawing when the transcript shows
        page.wait_for_function(f"() => ({METRIC_JS})('Active') === '6'", timeout=30_000)
        # the open conversation gets a new message, and another conversation starts
        document = json.loads(client.get(keys.conversation(hostile["conversation_id"])))
        latest = {**document["recent"][-1], "turn": 3, "role": "agent", "message_id": new_id()}
        latest.update(text="A refund is on its way.", timestamp_ms=now_ms())
        document["recent"].append(latest)
        document.update(messages=4, last_turn=3, updated_ms=now_ms())
        newcomer = sample_conversation(42, started_ms=now_ms() - 400_000)
        write_sample(client, prefix, [document, newcomer])
        wait_for_text(page, "A refund is on its way.", timeout_s=30)
        page.wait_for_function(f"() => ({METRIC_JS})('Active') === '7'", timeout=30_000)
        assert page.evaluate("window.__marker") == "same page"
        assert page.problems == []


def test_csv_download_from_the_browser(site, tmp_path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    url, _, _, _, documents, log_dir = site
    saved = Path(tmp_path / "conversations.csv")
    with open_page(url, wait_for="Download these conversations") as page:
        try:
            with page.expect_download(timeout=30_000) as download:
                page.get_by_role("button", name="Download these conversations (CSV)").click()
        except PlaywrightTimeout:
            # say why: the button's own error, and what the dashboard logged
            errors = page.locator("[data-testid=stDownloadButtonError]").all_inner_texts()
            log = "".join(p.read_text(errors="replace") for p in log_dir.glob("*.log"))
            pytest.fail(
                f"no download 30 s after the click; button errors {errors}; "
                f"dashboard log:\n{log[-3000:]}"
            )
        download.value.save_as(saved)
        assert download.value.suggested_filename == "conversations.csv"
    rows = list(csv.DictReader(io.StringIO(saved.read_text(encoding="utf-8"))))
    assert {d["conversation_id"] for d in documents} <= {r["conversation_id"] for r in rows}
    assert {r["end_reason"] for r in rows if r["status"] == "ended"} == {"goodbye"}
