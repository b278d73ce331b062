"""``/docs`` renders Swagger UI offline: every asset from the server itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.chromium import browser_page
from tests.e2e.server_process import ServerProcess, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("docs-page")
    with running_server(root) as process:
        yield process


def test_docs_renders_and_lists_the_endpoints_without_other_hosts(
    server: ServerProcess, tmp_path: Path
) -> None:
    with browser_page() as watched:
        page = watched.page
        page.goto(server.url + "/docs", wait_until="networkidle")
        page.wait_for_selector(".opblock", timeout=20_000)
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        assert "/v1/sessions" in [p.replace("\u200b", "") for p in paths]
        assert any("/step" in p for p in paths)
        assert page.locator(".opblock").count() >= 20
        assert page.locator(".title").first.inner_text().startswith("optserve")
        assert watched.errors == []
        assert watched.foreign(server.url) == []
        assert any(url.endswith("/docs/assets/swagger-ui-bundle.js") for url in watched.requests)
