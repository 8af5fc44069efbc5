"""A report looked at as a person would: opened in headless Chromium (the system's, Debian's package
``chromium``) through Playwright, every request and script error it makes recorded. The tests, the
bench and ``scripts/report_screenshot.py`` use it; Playwright is in the ``test`` extra, not a dependency.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from parroles.errors import ConfigError

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags, Chromium's own connections (updates, sync, field trials)
# are refused by a closed network and slow every start; QUIC off for the same reason.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
TIMEOUT_MS = 60_000  # the most any launch, load or wait may take
# Resolves once a frame was drawn after this point: the page is laid out and painted, not only parsed.
PAINTED = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"
INSTALL_HINT = "install Debian's package chromium: bash scripts/ensure-chromium.sh"


@dataclasses.dataclass
class OpenedPage:
    """A page and what it did: the URL of every request it made, every script error or console error."""

    page: Page
    requests: list[str]
    errors: list[str]
    load_seconds: float  # from asking for the page to its first frame painted after its load event


def chromium() -> str:
    """The Chromium to run; ConfigError (exit 2) saying what to install when there is none."""
    found = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if found is None:
        raise ConfigError(f"no Chromium at {CHROMIUM} nor on PATH: {INSTALL_HINT}")
    return found


@contextlib.contextmanager
def opened(path: str | os.PathLike[str], width: int = 1280, height: int = 900) -> Iterator[OpenedPage]:
    """The HTML file at ``path`` open in headless Chromium, loaded; closed on leaving."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise ConfigError("looking at a report needs the Python package playwright: pip install '.[test]' "
                          f"(its browser: {INSTALL_HINT})") from exc
    executable = chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_FLAGS),
                                             timeout=TIMEOUT_MS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(TIMEOUT_MS)
            requests: list[str] = []
            errors: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
            page.on("console", lambda message: errors.append(f"console {message.type}: {message.text}")
                    if message.type == "error" else None)
            begin = time.perf_counter()
            page.goto(Path(path).resolve().as_uri(), wait_until="load")
            page.evaluate(PAINTED)
            yield OpenedPage(page, requests, errors, time.perf_counter() - begin)
        finally:
            browser.close()
