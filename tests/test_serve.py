"""`llmctl serve`: the real CLI server over loopback, the official openai client, raw HTTP.

Two server processes: the main one (defaults) and a small one with an API key, a queue of
one and batch size one (auth, 429, graceful SIGTERM with a request in flight).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, build_trained_run, invoke_cli, run_cli, tiny_config_dict, write_config

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

MODEL = "tiny"


@pytest.fixture(autouse=True, scope="module")
def _keep_torch_threads():
    """Engines set torch's (process-wide) thread count; give other test modules theirs back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class Server:
    """`python -m llmctl serve CONFIG --port 0` in a subprocess; the URL is read from stderr."""

    def __init__(self, cfg_path: Path, env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmctl", "serve", str(cfg_path), "--port", "0"],
            cwd=REPO, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self.url = None
        deadline = time.time() + 300  # returns as soon as the server is up; a loaded machine loads slowly
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r" on (http://127\.0\.0\.1:\d+)/v1", line)
            if m:
                self.url = m.group(1)
                break
        assert self.url, "".join(self.lines)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def client(self, key: str = "none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def metric(self, name: str, headers: dict | None = None) -> float:
        text = httpx.get(self.url + "/metrics", headers=headers).text
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from llmctl.config import load_config
    from llmctl.tokenizer import DEFAULT_CHAT_TEMPLATE

    tmp = tmp_path_factory.mktemp("serve")
    d = tiny_config_dict(tmp / "run", model={"context_length": 512}, serve={"max_tokens_cap": 400, "model_name": MODEL})
    path = write_config(tmp / "c.yaml", d)
    rd = build_trained_run(tmp / "run", load_config(path))
    tok = AutoTokenizer.from_pretrained(rd.model_dir)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.save_pretrained(rd.model_dir)
    return tmp, path, d, rd


@pytest.fixture(scope="module")
def server(run_dir):
    s = Server(run_dir[1])
    yield s
    assert s.stop() == 0, "".join(s.lines)  # SIGTERM: graceful, exit 0
    assert "stopped (SIGTERM)" in "".join(s.lines)


def _check_envelope(r, object_: str, prefix: str, n: int):
    assert r.id.startswith(prefix) and len(r.id) > len(prefix) + 8
    assert r.object == object_ and r.model == MODEL and abs(r.created - time.time()) < 120
    assert [c.index for c in r.choices] == list(range(n))
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    u = r.usage
    assert u.prompt_tokens > 0 and u.completion_tokens >= 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_models_and_health(server):
    m = server.client().models.list()
    assert m.object == "list" and [(x.id, x.object, x.owned_by) for x in m.data] == [(MODEL, "model", "llmctl")]
    assert server.client().models.retrieve(MODEL).id == MODEL
    h = httpx.get(server.url + "/health")
    assert h.status_code == 200 and h.json() == {"status": "ok", "model": MODEL}


def test_completion_every_field(server, run_dir):
    from transformers import AutoTokenizer

    c = server.client()
    r = c.completions.create(model=MODEL, prompt="the quick", max_tokens=6, temperature=0)
    _check_envelope(r, "text_completion", "cmpl-", 1)
    ch = r.choices[0]
    assert ch.finish_reason == "length" and r.usage.completion_tokens == 6 and ch.logprobs is None and ch.text
    tok = AutoTokenizer.from_pretrained(run_dir[3].model_dir)
    assert r.usage.prompt_tokens == len(tok("the quick", add_special_tokens=False)["input_ids"])
    # n and a list of prompts: choices are prompt-major; prompt tokens count once per prompt.
    r2 = c.completions.create(model=MODEL, prompt=["the quick", "river"], max_tokens=4, n=2, temperature=1.0, seed=5)
    _check_envelope(r2, "text_completion", "cmpl-", 4)
    assert r2.usage.prompt_tokens == r.usage.prompt_tokens + c.completions.create(model=MODEL, prompt="river", max_tokens=1).usage.prompt_tokens
    # The same seed gives the same sample; token-id prompts are accepted.
    again = c.completions.create(model=MODEL, prompt=["the quick", "river"], max_tokens=4, n=2, temperature=1.0, seed=5)
    assert [x.text for x in again.choices] == [x.text for x in r2.choices]
    other = c.completions.create(model=MODEL, prompt=["the quick", "river"], max_tokens=4, n=2, temperature=1.0, seed=6)
    assert [x.text for x in other.choices] != [x.text for x in r2.choices]  # it samples, and the seed decides
    ids = c.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=2, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_stream_equals_non_stream_and_usage_chunk(server):
    c = server.client()
    full = c.completions.create(model=MODEL, prompt="river stones", max_tokens=12, temperature=0)
    chunks = list(c.completions.create(model=MODEL, prompt="river stones", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    text_chunks = [ch for ch in chunks if ch.choices]
    assert "".join(ch.choices[0].text for ch in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(ch.choices[0].finish_reason is None for ch in text_chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1 and all(ch.object == "text_completion" and ch.model == MODEL for ch in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    raw = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_chat_and_chat_stream(server):
    c = server.client()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    _check_envelope(r, "chat.completion", "chatcmpl-", 1)
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str) and r.usage.completion_tokens <= 8
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert all(ch.choices[0].delta.role is None for ch in chunks[1:])
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # max_completion_tokens is the newer name of max_tokens
    r2 = c.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=3, temperature=0)
    assert r2.usage.completion_tokens <= 3


def test_stop_sequence(server):
    c = server.client()
    full = c.completions.create(model=MODEL, prompt="the", max_tokens=16, temperature=0).choices[0].text
    stop = full[4:7]
    r = c.completions.create(model=MODEL, prompt="the", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[: full.find(stop)]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model=MODEL, prompt="the", max_tokens=16, temperature=0, stop=stop, stream=True))
    assert streamed == r.choices[0].text


def test_concurrent_greedy_equals_alone_and_shares_forward_passes(server):
    c = server.client()
    prompts = ["the quick", "seven wizards", "river", "a lazy dog jumps", "pale moon light", "old", "fox", "glow near"]
    _wait_idle(server)
    f0 = server.metric("llmctl_forward_passes_total")
    alone = [c.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0).choices[0].text for p in prompts]
    f1 = server.metric("llmctl_forward_passes_total")
    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        together = list(ex.map(lambda p: c.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0).choices[0].text, prompts))
    f2 = server.metric("llmctl_forward_passes_total")
    assert together == alone
    assert 0 < f1 - f0 <= len(prompts) * 24  # alone: at most one prefill + 23 decoding steps each
    assert f2 - f1 < (f1 - f0) / 2  # together: the forward passes were shared


def test_bad_requests_get_openai_errors_and_server_survives(server):
    c = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="other", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError, match="cap of 400"):
        c.completions.create(model=MODEL, prompt="x", max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="context length is 512") as e:
        c.completions.create(model=MODEL, prompt="the quick " * 300, max_tokens=100)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="suffix is not supported"):
        c.completions.create(model=MODEL, prompt="x", max_tokens=2, suffix="y")
    cases = [
        ("/v1/completions", "{not json", None),
        ("/v1/completions", "[1, 2]", None),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": "many"}), "max_tokens"),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "temperature": 7}), "temperature"),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "n": 0}), "n"),
        ("/v1/completions", json.dumps({"model": MODEL}), "prompt"),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": ""}), "prompt"),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": [1, 10**9]}), "prompt"),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}), "stop"),
        ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": []}), "messages"),
        ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}), "messages.0.role"),
    ]
    for path, body, param in cases:
        r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", body
        assert err["param"] == param and err["message"], (body, err)
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/completions").status_code == 405
    assert c.completions.create(model=MODEL, prompt="still", max_tokens=2).choices[0].finish_reason == "length"


def test_metrics(server):
    before = server.metric("llmctl_tokens_generated_total")
    server.client().completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0)
    httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    text = httpx.get(server.url + "/metrics").text
    for name in ("llmctl_requests_total", "llmctl_errors_total", "llmctl_tokens_generated_total", "llmctl_queue_depth",
                 "llmctl_running_sequences", "llmctl_request_latency_seconds_bucket", "llmctl_request_latency_seconds_count"):
        assert re.search(rf"^# TYPE {name.removesuffix('_bucket').removesuffix('_count')} ", text, re.M) and name in text
    assert server.metric("llmctl_tokens_generated_total") - before == 3
    assert re.search(r'^llmctl_requests_total\{path="/v1/completions",status="404"\} [1-9]', text, re.M)
    assert server.metric("llmctl_errors_total") >= 1 and server.metric("llmctl_request_latency_seconds_count") >= 1
    buckets = [float(v) for v in re.findall(r'^llmctl_request_latency_seconds_bucket\{le="[^"]+"\} (\S+)$', text, re.M)]
    assert buckets == sorted(buckets) and buckets[-1] == server.metric("llmctl_request_latency_seconds_count")


def _wait_idle(server, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.metric("llmctl_running_sequences") == 0:
            return
        time.sleep(0.05)
    raise AssertionError("sequences still running")


LONG = {"model": MODEL, "prompt": "the", "max_tokens": 400, "temperature": 0}  # greedy: never EOS with this model (checked)


class HeldServer:
    """The app and a real engine in this process, on a real loopback socket, with the engine
    held after each decoding step until the test lets it go.

    A disconnect test must not race the machine's decoding speed (a fast machine finished
    most of a 400-token answer before a 50 ms client timeout landed). Here the request is
    decoding and provably unfinished when the client hangs up, the server must mark it
    cancelled while the engine waits, and after the release not one more token is made.
    """

    def __init__(self, model_dir: Path):
        import uvicorn

        from llmctl.server.app import create_app
        from llmctl.server.engine import Engine
        from llmctl.server.metrics import Metrics
        from llmctl.stages.serve import _bind, _url

        self.metrics = Metrics()
        self.engine = Engine(str(model_dir), 4, 16, 0, self.metrics, device="cpu", threads=1)
        self.engine.load()
        self.jobs: list = []
        self.stepped, self.release = threading.Event(), threading.Event()
        submit, step = self.engine.submit, self.engine._step

        def recording_submit(jobs):
            self.jobs.extend(jobs)
            submit(jobs)

        def held_step(batch):
            out = step(batch)
            self.stepped.set()
            assert self.release.wait(60), "the test never released the engine"
            return out

        self.engine.submit, self.engine._step = recording_submit, held_step
        sock = _bind("127.0.0.1", 0)
        self.url = _url(sock)
        self.server = uvicorn.Server(uvicorn.Config(
            create_app(self.engine, MODEL, 400, None, self.metrics), log_level="warning", access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.engine.start()
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "the in-process server did not start"
            time.sleep(0.01)

    def hold(self) -> None:
        self.stepped.clear()
        self.release.clear()

    def cancelled_after_hang_up(self):
        """Wait until the server marks the held request cancelled; return it and its token count."""
        job = self.jobs[-1]
        n = len(job.tokens)  # the engine is still held: nothing more is made meanwhile
        deadline = time.time() + 30
        while not job.cancelled:
            assert time.time() < deadline, "the server did not notice the client hang up"
            time.sleep(0.01)
        return job, n

    def go_on_and_settle(self) -> None:
        """Release the engine and wait for a later request, decoded after the abandoned row's turn."""
        self.release.set()
        r = httpx.post(self.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1

    def close(self) -> None:
        self.release.set()
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.stop()


@pytest.fixture(scope="module")
def held(run_dir):
    s = HeldServer(run_dir[3].model_dir)
    yield s
    s.close()


def test_disconnect_mid_stream_cancels_generation(held):
    held.hold()
    with httpx.stream("POST", held.url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                assert held.stepped.wait(60), "the request never started decoding"
                break  # hang up after the first chunk, while the engine is held mid-answer
    job, n = held.cancelled_after_hang_up()
    assert 1 <= n < LONG["max_tokens"] and not job.finished
    held.go_on_and_settle()
    assert len(job.tokens) == n and not job.finished  # not one token after the hang-up


def test_disconnect_before_a_non_streamed_answer_cancels_generation(held):
    held.hold()
    host, port = held.url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps(LONG).encode()
    with socket.create_connection((host, int(port))) as c:
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert held.stepped.wait(60), "the request never started decoding"
    # The connection is closed with the answer unfinished: the engine is held after one step.
    job, n = held.cancelled_after_hang_up()
    assert 1 <= n < LONG["max_tokens"] and not job.finished
    held.go_on_and_settle()
    assert len(job.tokens) == n and not job.finished


def test_api_key_queue_limit_and_graceful_sigterm(run_dir):
    tmp, _, d, _ = run_dir
    d2 = json.loads(json.dumps(d))
    d2["serve"].update({"max_queue": 1, "max_batch_size": 1})
    s = Server(write_config(tmp / "c2.yaml", d2), {"LLMCTL_API_KEY": "sekrit"})
    try:
        assert "API key required" in "".join(s.lines)
        assert httpx.get(s.url + "/health").status_code == 200  # /health stays open
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(s.url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert s.client("sekrit").models.list().data[0].id == MODEL
        hdr = {"Authorization": "Bearer sekrit"}

        # One running, one waiting (max_queue 1): the rest are turned away with 429.
        def one(_):
            return httpx.post(s.url + "/v1/completions", headers=hdr, json={**LONG, "max_tokens": 150}, timeout=60)

        with cf.ThreadPoolExecutor(6) as ex:
            answers = list(ex.map(one, range(6)))
        statuses = [r.status_code for r in answers]
        assert statuses.count(200) >= 2 and 429 in statuses and set(statuses) <= {200, 429}, statuses
        busy = next(r for r in answers if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"
        # A request larger than the whole queue can never run: 400, not 429.
        r = httpx.post(s.url + "/v1/completions", headers=hdr, json={"model": MODEL, "prompt": "the", "n": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        assert s.metric("llmctl_errors_total", hdr) >= 1

        # SIGTERM while a streamed request is in flight: it finishes, then the server exits 0.
        with httpx.stream("POST", s.url + "/v1/completions", headers=hdr, timeout=60,
                          json={**LONG, "max_tokens": 120, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            s.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data:")]
        events = [first] + rest
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert sum(len(json.loads(e[6:])["choices"][0]["text"]) > 0 for e in events[:-1]) > 10
        assert s.proc.wait(60) == 0, "".join(s.lines)
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health")
    finally:
        s.stop()


# ---- the app in-process (no model load needed) ----------------------------------------
def test_health_is_503_until_the_model_is_loaded_and_chat_needs_a_template(run_dir):
    from fastapi.testclient import TestClient

    from llmctl.server.app import create_app
    from llmctl.server.engine import Engine
    from llmctl.server.metrics import Metrics

    rd = run_dir[3]
    seen = []  # /health while the warm-up (the rails' detectors, in `llmctl serve`) runs

    engine = Engine(str(rd.tokenizer_dir.parent.parent / "train" / "model"), 2, 4, 0, Metrics(), device="cpu", threads=1,
                    warm=lambda: seen.append((engine.model is not None, client.get("/health").status_code)))
    client = TestClient(create_app(engine, MODEL, 16, None, Metrics()))
    r = client.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "loading"} and r.headers["retry-after"]
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
    engine.load()
    assert seen == [(True, 503)]  # warmed after the model loaded, and not yet ready while warming
    assert client.get("/health").json()["status"] == "ok"
    engine.tok.chat_template = None
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"


def test_listening_socket_turns_nagle_off():
    """asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; with proto 0 every
    keep-alive response's body waited for the client's delayed ACK (40 ms a request)."""
    import socket

    from llmctl.stages.serve import _bind

    sock = _bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        sock.listen()
        client = socket.create_connection(sock.getsockname())
        conn, _ = sock.accept()
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1  # what each connection gets
        conn.close()
        client.close()
    finally:
        sock.close()


def test_request_plumbing_works_without_an_app():
    """The pieces the routes share are plain functions and objects: no app, no engine thread."""
    from types import SimpleNamespace

    from llmctl.server.jobs import budget
    from llmctl.server.routes.completions import CompletionChoices
    from llmctl.server.schemas import ApiError

    st = SimpleNamespace(max_tokens_cap=8, engine=SimpleNamespace(context_length=10))
    assert budget(st, None, 4, 16, "prompt") == 6 and budget(st, 3, 4, 16, "prompt") == 3
    with pytest.raises(ApiError) as e:
        budget(st, 7, 4, 16, "prompt")
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    # echo: a choice's first streamed chunk carries its prompt; later offsets count past it
    jobs = [SimpleNamespace(prompt_lps=[(65, None, [], 0)])]
    out = CompletionChoices(SimpleNamespace(token_text=chr), {"id": "x"}, [[65]], jobs, ["A"], 1, want=True)
    first = out.chunk(0, "b", None, [(98, -0.1, [], 0)])["choices"][0]
    later = out.chunk(0, "c", None, [(99, -0.2, [], 1)])["choices"][0]
    assert first["text"] == "Ab" and first["logprobs"]["tokens"] == ["A", "b"] and first["logprobs"]["text_offset"] == [0, 1]
    assert later["text"] == "c" and later["logprobs"]["text_offset"] == [2]


def test_metrics_text_is_prometheus_client_s_in_declared_label_order():
    """/metrics says what prometheus_client's generate_latest says, with labels in their
    declared order ({rail,action}, as always) and no _created samples; one registry per app."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from llmctl.server.metrics import Metrics

    m = Metrics()
    m.request("/v1/completions", 200, 0.3)
    m.request("/elsewhere", 404)
    m.add_tokens(5)
    m.safety({"rail": "output.secrets", "action": "redact"})
    m.set_running(2)
    ours = m.render().decode()
    assert 'llmctl_safety_interventions_total{rail="output.secrets",action="redact"} 1.0' in ours and "_created" not in ours
    assert re.search(r'^llmctl_requests_total\{path="other",status="404"\} 1', ours, re.M)

    def families(text: str) -> set:
        return {(f.name, f.type, f.documentation, tuple((s.name, tuple(sorted(s.labels.items())), s.value) for s in f.samples if not s.name.endswith("_created")))
                for f in text_string_to_metric_families(text) if not f.name.endswith("_created")}

    assert families(ours) == families(generate_latest(m.registry).decode())
    assert "llmctl_tokens_generated_total 0.0" in Metrics().render().decode()  # a new app counts from zero


# ---- the CLI's error paths ---------------------------------------------------------
@pytest.mark.timeout(300)  # refusals run in this process: one that serves instead must not hang the suite
def test_cli_errors(run_dir, tmp_path):
    _, path, _, rd = run_dir
    # No trained model in this run: exit 3 with the command to run.
    empty = write_config(tmp_path / "e.yaml", tiny_config_dict(tmp_path / "empty"))
    r = invoke_cli("serve", str(empty), "--port", "0")
    assert r.returncode == 3 and "llmctl train" in r.stderr and "Traceback" not in r.stderr
    # --model that is not a model directory: exit 3.
    r = invoke_cli("serve", str(path), "--model", str(tmp_path), "--port", "0")
    assert r.returncode == 3 and "no config.json" in r.stderr
    # A busy port: exit 1, one line.
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        r = run_cli("serve", str(path), "--port", str(busy.getsockname()[1]), timeout=120)
    finally:
        busy.close()
    assert r.returncode == 1 and "cannot listen on 127.0.0.1" in r.stderr and "Traceback" not in r.stderr
    # A model directory that does not load: the server stops and says why (exit 1).
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama", "hidden_size": "wide"}')
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bad / f).write_bytes((rd.model_dir / f).read_bytes())
    r = run_cli("serve", str(path), "--model", str(bad), "--port", "0", timeout=120)
    assert r.returncode == 1 and "cannot load the model" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # Without the serve extra: exit 2 naming the install command.
    shim = tmp_path / "shim" / "fastapi"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no fastapi here')\n")
    r = run_cli("serve", str(path), env={"PYTHONPATH": str(shim.parent)}, timeout=120)
    assert r.returncode == 2 and "pip install 'llmctl[serve]'" in r.stderr


# ---- logprobs ----------------------------------------------------------------------------
def _greedy_and_forced(rd, prompt_ids: list[int], n: int):
    """Greedy ids (HF generate) and the teacher-forced log-softmax over prompt + them."""
    import torch

    from llmctl.modeling import load_for_inference

    model, tok = load_for_inference(str(rd.model_dir))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, len(prompt_ids):].tolist()
        lp = torch.log_softmax(model(input_ids=torch.tensor([prompt_ids + new])).logits[0].float(), -1)
    return tok, new, lp


def test_completion_logprobs_and_echo_equal_a_teacher_forced_pass(server, run_dir):
    from openai.types import Completion

    rd = run_dir[3]
    body = {"model": MODEL, "prompt": "the quick brown", "max_tokens": 6, "temperature": 0, "logprobs": 3, "echo": True}
    raw = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    r = Completion.model_validate(raw)  # the official client's types
    lp = r.choices[0].logprobs
    from transformers import AutoTokenizer

    tok_ids = AutoTokenizer.from_pretrained(rd.model_dir)("the quick brown", add_special_tokens=False)["input_ids"]
    tok, new, forced = _greedy_and_forced(rd, tok_ids, 6)
    n = len(tok_ids)
    new = new[: len(lp.tokens) - n]
    assert lp.tokens == [tok.decode([t]) for t in tok_ids + new]
    assert r.choices[0].text == "the quick brown" + tok.decode(new)
    import torch

    from llmctl.modeling import load_for_inference

    model, _ = load_for_inference(str(rd.model_dir))
    with torch.no_grad():  # the first prompt token is scored after BOS
        after_bos = torch.log_softmax(model(input_ids=torch.tensor([[tok.bos_token_id]])).logits[0, -1], -1)
    assert lp.token_logprobs[0] == pytest.approx(float(after_bos[tok_ids[0]]), abs=1e-4)
    want = [float(forced[k - 1, t]) for k, t in enumerate(tok_ids + new) if k > 0]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert sum(lp.token_logprobs[n:]) == pytest.approx(sum(want[n - 1 :]), abs=1e-4)
    for k, top in enumerate(lp.top_logprobs):
        assert 3 <= len(top) <= 4 and top[lp.tokens[k]] == pytest.approx(lp.token_logprobs[k], abs=1e-6)
    for k in range(n, len(lp.tokens)):  # greedy: the chosen token is the likeliest
        assert lp.token_logprobs[k] == pytest.approx(max(lp.top_logprobs[k].values()), abs=1e-6)
    assert lp.text_offset[0] == 0 and lp.text_offset[n] == len("the quick brown")
    assert lp.text_offset == sorted(lp.text_offset)
    # streamed: the same tokens and numbers, chunk by chunk
    chunks = [json.loads(line[6:]) for line in httpx.post(server.url + "/v1/completions", json={**body, "stream": True}, timeout=60).text.splitlines()
              if line.startswith("data: {")]
    got = [x for c in chunks for x in (c["choices"][0]["logprobs"] or {}).get("token_logprobs", [])]
    assert got == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert [o for c in chunks for o in (c["choices"][0]["logprobs"] or {}).get("text_offset", [])] == lp.text_offset
    assert "".join(c["choices"][0]["text"] for c in chunks) == r.choices[0].text


def test_chat_logprobs_shape_bytes_and_sum(server, run_dir):
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    rd = run_dir[3]
    msgs = [{"role": "user", "content": "river stones"}]
    body = {"model": MODEL, "messages": msgs, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    r = ChatCompletion.model_validate(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json())
    content = r.choices[0].logprobs.content
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rd.model_dir)
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    _, new, forced = _greedy_and_forced(rd, ids, 6)
    new = new[: len(content)]
    assert [c.token for c in content] == [tok.decode([t]) for t in new]
    assert sum(c.logprob for c in content) == pytest.approx(sum(float(forced[len(ids) - 1 + k, t]) for k, t in enumerate(new)), abs=1e-4)
    assert bytes(b for c in content for b in c.bytes).decode("utf-8", errors="replace") == tok.decode(new)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    lines = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60).text.splitlines()
    chunks = [ChatCompletionChunk.model_validate(json.loads(x[6:])) for x in lines if x.startswith("data: {")]
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [(c.token, round(c.logprob, 5)) for c in streamed] == [(c.token, round(c.logprob, 5)) for c in content]
    # without logprobs: none computed, none sent
    plain = httpx.post(server.url + "/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": None}, timeout=60).json()
    assert plain["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
])
def test_bad_logprobs_are_400(server, path, extra, param):
    body = {"model": MODEL, "max_tokens": 2, **({"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"}), **extra}
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
