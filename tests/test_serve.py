"""`llmctl serve`: the real server over loopback, the official openai client, raw HTTP."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, build_trained_run, tiny_config_dict, write_config

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")


class Server:
    def __init__(self, cfg_path: Path, env: dict | None = None, *extra: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmctl", "serve", str(cfg_path), "--port", "0", *extra],
            cwd=REPO, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        deadline = time.time() + 120
        self.url = None
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"on (http://[\d.]+:\d+)/v1", line)
            if m:
                self.url = m.group(1)
                break
        assert self.url, "".join(self.lines)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def client(self, key: str = "none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from llmctl.config import load_config
    from llmctl.tokenizer import DEFAULT_CHAT_TEMPLATE

    tmp = tmp_path_factory.mktemp("serve")
    d = tiny_config_dict(tmp / "run", model={"context_length": 512}, serve={"max_tokens_cap": 400, "model_name": "tiny"})
    path = write_config(tmp / "c.yaml", d)
    rd = build_trained_run(tmp / "run", load_config(path))
    tok = AutoTokenizer.from_pretrained(rd.model_dir)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.save_pretrained(rd.model_dir)
    return tmp, path, d


@pytest.fixture(scope="module")
def server(run_dir):
    s = Server(run_dir[1])
    yield s
    assert s.stop() == 0, "".join(s.lines)  # SIGTERM: graceful, exit 0


def _check_completion(r, n=1):
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == "tiny" and r.created > 0
    assert len(r.choices) == n and [c.index for c in r.choices] == list(range(n))
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens and r.usage.prompt_tokens > 0


def test_models_and_health(server):
    m = server.client().models.list()
    assert [x.id for x in m.data] == ["tiny"] and m.data[0].object == "model"
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok"


def test_completion_fields_and_n(server):
    c = server.client()
    r = c.completions.create(model="tiny", prompt="the quick", max_tokens=6, temperature=0)
    _check_completion(r)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    r2 = c.completions.create(model="tiny", prompt="the quick", max_tokens=6, n=3, temperature=1.0, seed=1)
    _check_completion(r2, 3)


def test_stream_equals_non_stream(server):
    c = server.client()
    full = c.completions.create(model="tiny", prompt="river stones", max_tokens=12, temperature=0).choices[0].text
    chunks = list(c.completions.create(model="tiny", prompt="river stones", max_tokens=12, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length" and all(ch.id == chunks[0].id for ch in chunks)
    raw = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2, "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]")


def test_chat_and_chat_stream(server):
    c = server.client()
    msgs = [{"role": "user", "content": "hello there"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens <= 8
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content


def test_stop_sequence(server):
    c = server.client()
    full = c.completions.create(model="tiny", prompt="the", max_tokens=16, temperature=0).choices[0].text
    stop = full[4:7]
    r = c.completions.create(model="tiny", prompt="the", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text and full.startswith(r.choices[0].text)


def test_concurrent_greedy_equals_alone(server):
    c = server.client()
    prompts = ["the quick", "seven wizards", "river", "a lazy dog jumps", "pale moon light", "old"]
    alone = [c.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0).choices[0].text for p in prompts]
    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        together = list(ex.map(lambda p: c.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0).choices[0].text, prompts))
    assert together == alone


def test_bad_requests_get_openai_errors_and_server_survives(server):
    c = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="other", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="cap"):
        c.completions.create(model="tiny", prompt="x", max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="context length"):
        c.completions.create(model="tiny", prompt="the quick " * 300, max_tokens=100)
    for body in ("{not json", json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "many"}), json.dumps({"model": "tiny"}), json.dumps({"model": "tiny", "messages": []})):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert c.completions.create(model="tiny", prompt="still", max_tokens=2).choices[0].text is not None


def test_metrics(server):
    server.client().completions.create(model="tiny", prompt="x", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("llmctl_requests_total", "llmctl_errors_total", "llmctl_tokens_generated_total", "llmctl_queue_depth", "llmctl_request_latency_seconds_bucket"):
        assert name in text
    tokens = int(re.search(r"^llmctl_tokens_generated_total (\d+)", text, re.M).group(1))
    assert tokens >= 3


def test_disconnect_mid_stream_frees_the_slot(server):
    def tokens():
        return int(re.search(r"^llmctl_tokens_generated_total (\d+)", httpx.get(server.url + "/metrics").text, re.M).group(1))

    before = tokens()
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 400, "temperature": 1.0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # hang up after the first chunk
    time.sleep(1.5)
    t0 = time.time()
    server.client().completions.create(model="tiny", prompt="x", max_tokens=2)
    assert time.time() - t0 < 5
    assert tokens() - before < 400  # the abandoned request stopped generating


def test_api_key_and_queue_limit(run_dir):
    tmp, path, d = run_dir
    d2 = json.loads(json.dumps(d))
    d2["serve"].update({"max_queue": 1, "max_batch_size": 1})
    p2 = write_config(tmp / "c2.yaml", d2)
    s = Server(p2, {"LLMCTL_API_KEY": "sekrit"})
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        r = httpx.get(s.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert s.client("sekrit").models.list().data[0].id == "tiny"
        hdr = {"Authorization": "Bearer sekrit"}

        def one(_):
            return httpx.post(s.url + "/v1/completions", headers=hdr, json={"model": "tiny", "prompt": "the", "max_tokens": 200, "temperature": 1.0}, timeout=60)

        with cf.ThreadPoolExecutor(8) as ex:
            codes = [r for r in ex.map(one, range(8))]
        statuses = [r.status_code for r in codes]
        assert 429 in statuses and 200 in statuses
        busy = next(r for r in codes if r.status_code == 429)
        assert busy.headers.get("retry-after") and busy.json()["error"]["type"] == "rate_limit_error"
    finally:
        assert s.stop() == 0
