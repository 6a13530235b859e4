"""The README's images, generated rather than drawn by hand: `make screenshots` (RUN=runs/quickstart).

Writes RUN/report.html (as `llmctl report RUN` does), photographs three of its sections, then
starts `llmctl serve` on the run's model, sends one prompt through the playground and
photographs the answer. Debian's chromium through Playwright, as the tests use it.

  python docs/screenshots.py RUN      -> docs/img/report-training.png, report-eval.png,
                                         report-samples.png, playground.png
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "img"
CHROMIUM = os.environ.get("LLMCTL_CHROMIUM", "/usr/bin/chromium")
PROMPT = 'def read_config(path):\n    """'
MAX_HEIGHT = 1200  # a section taller than this is cut: the README shows its top


@contextmanager
def served(run: Path):
    """`llmctl serve` on the run (its recorded config), on a free loopback port; yields the URL."""
    cfg = run / "train" / "config.yaml"
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "serve", str(cfg), "--run-dir", str(run), "--port", "0"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    lines, url = [], None
    deadline = time.time() + 300
    while time.time() < deadline and url is None:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r" on (http://127\.0\.0\.1:\d+)/v1", line)
        url = m.group(1) if m else None
    if url is None:
        proc.kill()
        sys.exit("llmctl serve did not start:\n" + "".join(lines))
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep its pipe drained
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


def shoot(page, selector: str, path: Path) -> None:
    box = page.locator(selector).bounding_box()
    page.screenshot(path=str(path), full_page=True,
                    clip={"x": box["x"], "y": box["y"], "width": box["width"], "height": min(box["height"], MAX_HEIGHT)})
    print(f"wrote {path.relative_to(REPO)}")


def main(run: Path) -> None:
    from playwright.sync_api import sync_playwright

    from llmctl.report import write
    from llmctl.rundir import RunDir

    rd = RunDir(run)
    print(f"wrote {write(rd)['report']}")
    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 980, "height": 900})
        page.goto(rd.report_html_path.resolve().as_uri())
        for key in ("training", "eval", "samples"):
            shoot(page, f"#{key}", OUT / f"report-{key}.png")
        with served(run) as url:
            page.goto(url + "/")
            page.wait_for_function("() => document.getElementById('status').textContent === 'ready'", timeout=120_000)
            page.check("input[name=mode][value=completion]")
            page.fill("#max_tokens", "48")
            page.fill("#seed", "1")
            page.fill("#prompt", PROMPT)
            page.click("#send")
            page.wait_for_function("() => !document.getElementById('send').disabled", timeout=120_000)
            page.locator(".assistant span.tok").nth(3).hover()
            page.screenshot(path=str(OUT / "playground.png"))
            print(f"wrote {(OUT / 'playground.png').relative_to(REPO)}")
        browser.close()


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python docs/screenshots.py RUN   (a run directory, e.g. runs/quickstart after 'make demo')")
    main(Path(sys.argv[1]))
