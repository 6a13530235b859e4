"""The playground at GET / of `llmctl serve`, in a real browser: a prompt streams its answer,
a wrong API key is a handled 401, rails interventions are shown as such, nothing is fetched
from elsewhere and the key never leaves page memory. Also: `serve.playground: false`.

The servers run in this process (the app and a real engine on a tiny random model, on a real
loopback socket); several apps share one engine.
"""

from __future__ import annotations

import threading
import time

import pytest

from browser_util import Browser, needs_browser, screenshot
from conftest import build_trained_run, tiny_config_dict, write_config

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

MODEL = "tiny"
KEY = "sekrit-key-123"


class AppServer:
    """One app over a shared engine, served by uvicorn in a thread on 127.0.0.1:0."""

    def __init__(self, engine, metrics, api_key=None, rails=None, playground_page=True):
        import uvicorn

        from llmctl.server.app import create_app
        from llmctl.stages.serve import _bind, _url

        sock = _bind("127.0.0.1", 0)
        self.url = _url(sock)
        app = create_app(engine, MODEL, 400, api_key, metrics, rails=rails, playground_page=playground_page)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "the in-process server did not start"
            time.sleep(0.01)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer

    from llmctl.config import load_config
    from llmctl.server.engine import Engine
    from llmctl.server.metrics import Metrics
    from llmctl.tokenizer import DEFAULT_CHAT_TEMPLATE

    threads = torch.get_num_threads()
    tmp = tmp_path_factory.mktemp("playground")
    cfg = load_config(write_config(tmp / "c.yaml", tiny_config_dict(tmp / "run", model={"context_length": 512})))
    rd = build_trained_run(tmp / "run", cfg)
    tok = AutoTokenizer.from_pretrained(rd.model_dir)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.save_pretrained(rd.model_dir)
    metrics = Metrics()
    eng = Engine(str(rd.model_dir), 4, 16, 0, metrics, device="cpu", threads=1)
    eng.load()
    eng.gate = Gate()
    step = eng._step

    def gated_step(batch):
        out = step(batch)
        eng.gate.after_step()
        return out

    eng._step = gated_step
    eng.start()
    yield eng, metrics
    eng.gate.release.set()
    eng.stop()
    torch.set_num_threads(threads)


class Gate:
    """Holds the engine after a number of decoding steps until the test lets it go: an answer
    is then provably unfinished while the test looks at the page."""

    def __init__(self):
        self.steps_left: int | None = None  # None: never hold
        self.held, self.release = threading.Event(), threading.Event()

    def hold_after(self, steps: int) -> None:
        self.held.clear()
        self.release.clear()
        self.steps_left = steps

    def after_step(self) -> None:
        if self.steps_left is None:
            return
        self.steps_left -= 1
        if self.steps_left <= 0:
            self.held.set()
            assert self.release.wait(60), "the test never released the engine"
            self.steps_left = None


@pytest.fixture(scope="module")
def servers(engine):
    from llmctl.config import SafetyConfig
    from llmctl.safety import Rails

    eng, metrics = engine
    # input rail: the word "forbidden" is refused; output rail: every answer is cut (a regex that
    # matches any letter), so a blocked answer is certain whatever the random model says.
    rails_in = Rails(SafetyConfig(deny={"words": ["forbidden"]}, output={"deny": "off"}), stage="serve")
    rails_out = Rails(SafetyConfig(deny={"regex": ["[A-Za-z]"]}, input={"deny": "off"}), stage="serve")
    out = {"open": AppServer(eng, metrics), "keyed": AppServer(eng, metrics, api_key=KEY),
           "rails_in": AppServer(eng, metrics, rails=rails_in), "rails_out": AppServer(eng, metrics, rails=rails_out),
           "off": AppServer(eng, metrics, playground_page=False)}
    yield out
    for s in out.values():
        s.close()


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


def test_page_is_served_open_self_contained_and_can_be_turned_off(servers):
    r = httpx.get(servers["keyed"].url + "/")  # the page holds no secret: no key needed for it
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    page = r.text
    for bad in ("<script src", "<link", "http://", "https://", "url(", "@import", "localStorage", "sessionStorage", "cookie"):
        assert bad not in page, bad
    assert httpx.get(servers["keyed"].url + "/v1/models").status_code == 401  # the API still needs it
    assert httpx.post(servers["keyed"].url + "/").status_code == 401  # only GET / is open
    assert httpx.get(servers["off"].url + "/").status_code == 404


def test_serve_playground_key_reaches_the_app(tmp_path):
    from fastapi.testclient import TestClient

    from llmctl.config import SafetyConfig, load_config
    from llmctl.safety import Rails
    from llmctl.server.metrics import Metrics
    from llmctl.stages.serve import _engine_and_server

    for on in (True, False):
        cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run", serve={"playground": on})))
        # the engine is built, not started: no model is loaded
        _, server = _engine_and_server(cfg, str(tmp_path / "nowhere"), None, Metrics(), Rails(SafetyConfig(), stage="serve"))
        assert TestClient(server.config.app).get("/").status_code == (200 if on else 404)


def _send(page, prompt: str, mode: str = "chat", wait: bool = True):
    page.check(f"input[name=mode][value={mode}]")
    page.fill("#max_tokens", "24")
    page.fill("#seed", "3")
    page.fill("#prompt", prompt)
    page.click("#send")
    out = page.locator(".assistant .text").last
    if wait:
        page.wait_for_function("() => !document.getElementById('send').disabled", timeout=60_000)
    return out


def _only_this_server(log, url: str) -> None:
    assert log.requests and all(u.startswith(url + "/") for u in log.urls()), log.urls()


@needs_browser
@pytest.mark.parametrize("mode", ["chat", "completion"])
def test_prompt_streams_into_the_page_with_logprobs(servers, engine, browser, mode):
    url, gate = servers["open"].url, engine[0].gate
    with browser.page() as (page, log):
        page.goto(url + "/")
        page.wait_for_function("() => document.getElementById('model').textContent === 'tiny'")
        assert page.locator("#keybox").is_hidden()  # no key on this server: none asked for
        # Streamed: text is on the page while the engine is held mid-answer.
        gate.hold_after(6)
        out = _send(page, "the quick brown fox", mode, wait=False)
        assert gate.held.wait(60), "the request never started decoding"
        page.wait_for_function("() => document.querySelector('.assistant .text').textContent.length > 0", timeout=30_000)
        assert page.locator("#send").is_disabled() and out.get_attribute("data-finish") is None  # not finished yet
        partial = out.inner_text()
        gate.release.set()
        page.wait_for_function("() => !document.getElementById('send').disabled", timeout=60_000)
        assert out.inner_text().startswith(partial) and len(out.inner_text()) > len(partial)
        text = out.inner_text()
        assert text.strip(), "no text appeared"
        assert int(out.get_attribute("data-chunks")) >= 2, "the answer came in one piece, not streamed"
        assert out.get_attribute("data-finish") in ("stop", "length")
        toks = out.locator("span.tok")
        assert toks.count() >= 2 and "alternatives:" in toks.first.get_attribute("title")  # logprobs on hover
        posts = [r for r in log.requests if r.method == "POST"]
        path = "/v1/chat/completions" if mode == "chat" else "/v1/completions"
        assert [r.url for r in posts] == [url + path]
        body = posts[0].post_data_json
        assert body["stream"] is True and body["seed"] == 3 and body["max_tokens"] == 24
        # Retry sends the same request again and replaces the answer.
        page.click("#retry")
        page.wait_for_function("() => !document.getElementById('send').disabled", timeout=60_000)
        assert page.locator(".assistant").count() == 1 and page.locator(".user").count() == 1
        assert page.locator(".assistant .text").inner_text() == text  # same seed, same answer
        _only_this_server(log, url)
        log.assert_clean()
        screenshot(page, f"playground-{mode}.png")


@needs_browser
def test_api_key_401_is_handled_and_key_stays_in_memory(servers, browser):
    url = servers["keyed"].url
    with browser.page() as (page, log):
        page.goto(url + "/")
        page.wait_for_selector("#keybox", state="visible")  # GET v1/models said 401: the page asks
        page.fill("#key", "wrong-key")
        page.click("#usekey")
        page.wait_for_function("() => document.getElementById('keymsg').textContent.includes('401')")
        out = _send(page, "hello")
        assert "401" in out.inner_text() and page.locator("#keybox").is_visible()
        page.fill("#key", KEY)
        page.click("#usekey")
        page.wait_for_function("() => document.getElementById('model').textContent === 'tiny'")
        assert page.locator("#keybox").is_hidden()
        out = _send(page, "hello again")
        assert out.inner_text().strip() and int(out.get_attribute("data-chunks")) >= 1
        auths = [r.headers.get("authorization") for r in log.requests if r.url.startswith(url + "/v1/")]
        assert f"Bearer {KEY}" in auths and "Bearer wrong-key" in auths
        assert all(KEY not in u and "wrong-key" not in u for u in log.urls())  # never in a URL
        stored = page.evaluate("() => JSON.stringify([localStorage, sessionStorage, document.cookie, location.href])")
        assert KEY not in stored and "wrong-key" not in stored
        _only_this_server(log, url)
        # The 401s were answered by the page; a browser logs a failed fetch as a console error.
        assert not log.page_errors and all("401" in e for e in log.console_errors), log.console_errors
        screenshot(page, "playground-401.png")


@needs_browser
def test_rail_interventions_are_shown_as_such(servers, browser):
    with browser.page() as (page, log):
        page.goto(servers["rails_in"].url + "/")
        page.wait_for_function("() => document.getElementById('model').textContent === 'tiny'")
        _send(page, "say something forbidden")
        badge = page.locator(".assistant .rail").last
        assert "prompt refused" in badge.inner_text()
        assert "safety rail 'input.deny'" in page.locator(".assistant").last.inner_text()
    with browser.page() as (page, log):
        page.goto(servers["rails_out"].url + "/")
        page.wait_for_function("() => document.getElementById('model').textContent === 'tiny'")
        out = _send(page, "the quick brown fox", "completion")
        assert out.get_attribute("data-finish") == "content_filter"
        assert "answer blocked" in page.locator(".assistant .rail").last.inner_text()
        assert not log.page_errors and not [e for e in log.console_errors if "400" not in e]
        screenshot(page, "playground-rail.png")


@needs_browser
def test_stop_cuts_the_answer_and_chat_keeps_its_history(servers, engine, browser):
    url, gate = servers["open"].url, engine[0].gate
    with browser.page() as (page, log):
        page.goto(url + "/")
        page.wait_for_function("() => document.getElementById('model').textContent === 'tiny'")
        out = _send(page, "first question")
        first = out.inner_text()
        gate.hold_after(3)
        out = _send(page, "second question", wait=False)
        assert gate.held.wait(60), "the request never started decoding"
        page.click("#stopbtn")
        page.wait_for_function("() => !document.getElementById('send').disabled", timeout=30_000)
        gate.release.set()
        assert "[stopped]" in page.locator(".assistant").last.text_content() and out.get_attribute("data-finish") is None
        posts = [r.post_data_json for r in log.requests if r.method == "POST"]
        assert [m["content"] for m in posts[1]["messages"]] == ["first question", first, "second question"]
        log.assert_clean()
