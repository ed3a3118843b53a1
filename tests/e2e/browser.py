"""Drive a real headless Chromium (Debian's /usr/bin/chromium) with Playwright, and serve the
dashboard for it. Reusable by every end-to-end test:

    with serve_dashboard(env) as url, open_page(url, wait_for="Conversations") as page:
        assert "Dana" in text_content(page)
        screenshot(page, "dashboard")

Playwright's own browser download is never used (`playwright install` needs the internet):
the browser is the system's Chromium. Tests skip when Playwright or Chromium is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from supportsim.live.sample import dashboard_argv
from supportsim.local.processes import REPO_ROOT, free_port, spawn, stop_process

ARTIFACTS = REPO_ROOT / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str | None:
    """The system Chromium (`CHROMIUM` overrides), or None when there is none."""
    candidates = [os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def require_browser() -> str:
    """The Chromium path; skips the calling test when Playwright or Chromium is missing."""
    pytest.importorskip("playwright.sync_api", reason="pip install playwright==1.65.2")
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium: apt-get install chromium (or set CHROMIUM)")
    return path


@contextlib.contextmanager
def open_page(
    url: str,
    *,
    wait_for: str | None = None,
    timeout_s: float = 60.0,
    viewport: tuple[int, int] = (1440, 1000),
):
    """A page of a fresh headless Chromium (own throwaway profile) opened at `url`.

    With `wait_for`, waits until that text is visible. Console errors and uncaught page
    errors are collected on `page.problems` (a list of strings).
    """
    from playwright.sync_api import sync_playwright

    executable = require_browser()
    profile = tempfile.mkdtemp(prefix="supportsim-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=executable,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": viewport[0], "height": viewport[1]},
            )
            try:
                page = context.pages[0] if context.pages else context.new_page()
                page.set_default_timeout(timeout_s * 1000)
                problems: list[str] = []
                page.problems = problems
                page.on("pageerror", lambda error: problems.append(f"pageerror: {error}"))
                page.goto(url, wait_until="domcontentloaded")
                if wait_for is not None:
                    wait_for_text(page, wait_for, timeout_s)
                yield page
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def wait_for_text(page, text: str, timeout_s: float = 30.0) -> None:
    """Wait until `text` (exact substring) is visible somewhere on the page."""
    page.get_by_text(text, exact=False).first.wait_for(state="visible", timeout=timeout_s * 1000)


def text_content(page) -> str:
    """The page's visible text."""
    return page.inner_text("body")


def screenshot(page, name: str, max_height: int = 6000) -> Path:
    """Save a screenshot of the whole app as artifacts/<name>.png (git-ignored); return it.

    Streamlit scrolls inside its main container, not the document, so the viewport is made
    as tall as that container's content for the shot, then restored.
    """
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    size = page.viewport_size
    height = page.evaluate(
        "() => Math.max(document.documentElement.scrollHeight,"
        " ...Array.from(document.querySelectorAll('[data-testid=stMain], section.main'),"
        " e => e.scrollHeight))"
    )
    if size and height > size["height"]:
        page.set_viewport_size({"width": size["width"], "height": min(height, max_height)})
        page.wait_for_timeout(500)
    try:
        page.screenshot(path=str(path), full_page=True)
    finally:
        if size:
            page.set_viewport_size(size)
    return path


def wait_for_http(url: str, timeout_s: float, process=None) -> None:
    """Wait until `url` answers 200 (and the process, if given, is still running)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode}")
        # only http URLs this module builds reach here
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310
            if response.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


@contextlib.contextmanager
def serve_dashboard(env: dict[str, str], log_dir: Path, timeout_s: float = 60.0) -> Iterator[str]:
    """Run `streamlit run dashboard/main.py` on a free port; yield its URL; stop it by PID."""
    port = free_port()
    log_path = log_dir / f"dashboard-{port}.log"
    process = spawn(dashboard_argv(port), log_path, env)
    try:
        try:
            wait_for_http(f"http://127.0.0.1:{port}/_stcore/health", timeout_s, process)
        except (RuntimeError, TimeoutError) as exc:
            log = log_path.read_text(errors="replace") if log_path.exists() else ""
            raise RuntimeError(f"dashboard did not start: {exc}\n{log[-3000:]}") from exc
        yield f"http://127.0.0.1:{port}/"
    finally:
        stop_process(process, timeout=5)
