"""Headless Chromium (Debian's ``chromium``) driven by Playwright, watching what a page does:
every request it makes, and every console error or uncaught exception.

Playwright's own browsers are never downloaded: the system's chromium is used, with the
flags that keep it from calling home (no background networking, updates, sync).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("needs Debian's chromium (apt-get install chromium; .ci/run installs it)")
    return path


@dataclass
class Watched:
    page: Any
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def foreign(self, origin: str) -> list[str]:
        """Requests to anywhere but ``origin`` (data: and blob: URLs stay in the page)."""
        local = (origin + "/", "data:", "blob:")
        return [url for url in self.requests if not url.startswith(local) and url != origin]


@contextmanager
def browser_page() -> Iterator[Watched]:
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = chromium_path()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            watched = Watched(page)
            page.on("request", lambda request: watched.requests.append(request.url))
            page.on(
                "console",
                lambda message: (
                    watched.errors.append(message.text) if message.type == "error" else None
                ),
            )
            page.on("pageerror", lambda error: watched.errors.append(str(error)))
            yield watched
        finally:
            browser.close()
