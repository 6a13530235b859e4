"""A real browser for the tests: Debian's Chromium driven by Playwright's Python package
(`executable_path`: no browser download). `make test` installs Chromium where it is missing
(`make browser`); elsewhere these tests skip and say why.

`Browser.page()` records what a page did: console errors, uncaught exceptions and every
request it made, so a test can assert that nothing was fetched from elsewhere. Screenshots go
to build/test-artifacts/ (or $LLMCTL_TEST_ARTIFACTS), kept after the run.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("LLMCTL_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("LLMCTL_TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))


def skip_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed: pip install -e '.[browser]' (make test installs it)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing: 'make browser' installs Debian's chromium (apt-get, as root), or set LLMCTL_CHROMIUM"
    return None


needs_browser = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


@dataclass
class PageLog:
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list = field(default_factory=list)  # playwright Request objects

    def urls(self) -> list[str]:
        return [r.url for r in self.requests]

    def assert_clean(self) -> None:
        assert not self.page_errors, self.page_errors
        assert not self.console_errors, self.console_errors


class Browser:
    def __init__(self):
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(executable_path=CHROMIUM)

    @contextmanager
    def page(self, width: int = 1100, height: int = 800):
        ctx = self.browser.new_context(viewport={"width": width, "height": height})
        page = ctx.new_page()
        log = PageLog()
        page.on("console", lambda m: log.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: log.page_errors.append(str(e)))
        page.on("request", lambda r: log.requests.append(r))
        try:
            yield page, log
        finally:
            ctx.close()

    def close(self) -> None:
        self.browser.close()
        self._pw.stop()


def screenshot(page, name: str, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=full_page)
    return path
