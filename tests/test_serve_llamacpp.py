"""`serve.engine: llama.cpp` (llmctl/inference/llamacpp.py, llmctl/server/llamacpp_engine.py).

Without llama.cpp (CI): the config key, the refusal when no llama-server is found, the GGUF
chosen or asked for, the request llmctl sends, and the whole engine (stop strings, EOS,
logprobs, the check at load) against a stand-in llama-server (tests/fixtures/fake_llama_server.py)
that decodes with transformers. With llama.cpp installed: the real llama-server on the run's
exported GGUF gives the torch engine's greedy text.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import invoke_cli
from llmctl.inference import llamacpp

FAKE = Path(__file__).parent / "fixtures" / "fake_llama_server.py"


def _bin_dir(tmp_path: Path, model_dir: Path | None = None, skew: float = 0.0, log: Path | None = None, hold: Path | None = None,
             keepalive: float | None = None) -> Path:
    """A folder holding an executable `llama-server` that runs the stand-in on this model."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    exe = d / "llama-server"
    env = f"FAKE_LLAMA_MODEL='{model_dir}' FAKE_LLAMA_SKEW={skew} FAKE_LLAMA_LOG='{log or ''}' FAKE_LLAMA_HOLD='{hold or ''}' FAKE_LLAMA_KEEPALIVE_S='{keepalive or ''}' "
    exe.write_text(f"#!/bin/sh\n{env}exec '{sys.executable}' '{FAKE}' \"$@\"\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return d


@pytest.fixture
def no_llama_cpp(tmp_path, monkeypatch):
    if Path("/opt/llamacpp/build/bin/llama-server").exists():
        pytest.skip("/opt/llamacpp/build/bin has a llama-server: the refusal cannot be provoked")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("LLAMA_CPP_BIN", str(empty))
    monkeypatch.setenv("PATH", str(empty))
    return empty


def test_engine_key_is_validated(tiny_cfg):
    path, _ = tiny_cfg
    ok = invoke_cli("config", "validate", str(path), "--set", "serve.engine=llama.cpp")
    assert ok.returncode == 0, ok.stderr
    bad = invoke_cli("config", "validate", str(path), "--set", "serve.engine=vllm")
    assert bad.returncode == 2 and "serve.engine" in bad.stderr


def test_refused_without_llama_server(trained_run, no_llama_cpp):
    path, _, _ = trained_run
    r = invoke_cli("serve", str(path), "--set", "serve.engine=llama.cpp", "--port", "0")
    assert r.returncode == 2, r.stderr
    assert "no llama-server found" in r.stderr and "LLAMA_CPP_BIN" in r.stderr and "serve.engine: torch" in r.stderr


def test_missing_gguf_export_names_the_export_command(trained_run, tmp_path, monkeypatch):
    path, _, rd = trained_run
    monkeypatch.setenv("LLAMA_CPP_BIN", str(_bin_dir(tmp_path)))
    r = invoke_cli("serve", str(path), "--set", "serve.engine=llama.cpp", "--set", "serve.quantize=int8", "--port", "0")
    assert r.returncode == 3, r.stderr
    assert "model-q8_0.gguf is missing" in r.stderr and "q8_0 to export.gguf_types" in r.stderr and "llmctl export" in r.stderr
    d = invoke_cli("serve", str(path), "--set", "serve.engine=llama.cpp", "--model", str(rd.model_dir), "--port", "0")
    assert d.returncode == 2 and "runs a GGUF file" in d.stderr


def test_the_run_gguf_export_is_what_is_served(trained_run):
    from llmctl.stages.serve import gguf_to_serve

    path, cfg, rd = trained_run
    r = invoke_cli("export", str(path), "--set", "export.formats=[hf, gguf]", "--set", "export.gguf_types=[f32, q8_0]")
    assert r.returncode == 0, r.stderr
    cfg.export.formats, cfg.export.gguf_types = ["hf", "gguf"], ["f32", "q8_0"]  # as the export ran
    assert gguf_to_serve(cfg, rd, None) == str(rd.export_dir("gguf") / "model-f32.gguf")
    cfg.serve.quantize = "int8"
    assert gguf_to_serve(cfg, rd, None) == str(rd.export_dir("gguf") / "model-q8_0.gguf")
    f = rd.export_dir("gguf") / "model-q8_0.gguf"
    assert gguf_to_serve(cfg, rd, str(f)) == str(f)


def test_request_maps_the_sampler_settings():
    b = llamacpp.completion_body([1, 2, 3], 7, temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.2,
                                 presence_penalty=0.5, frequency_penalty=0.25, seed=2**40 + 3, logprobs=0, context=128)
    assert b["prompt"] == [1, 2, 3] and b["n_predict"] == 7 and b["stream"] and b["return_tokens"]
    assert llamacpp.completion_body([1], 1, stream=False)["stream"] is False
    assert (b["temperature"], b["top_k"], b["top_p"], b["repeat_penalty"]) == (0.7, 5, 0.9, 1.2)
    assert (b["presence_penalty"], b["frequency_penalty"], b["seed"], b["repeat_last_n"]) == (0.5, 0.25, 3, 128)
    assert b["samplers"] == ["penalties", "temperature", "top_k", "top_p"]  # transformers' order
    # only the steps that change anything (llama.cpp runs each over the whole vocabulary); greedy is top-k 1
    plain = llamacpp.completion_body([1], 1, temperature=0.8)
    assert plain["samplers"] == ["temperature"] and plain["top_k"] == 0
    greedy = llamacpp.completion_body([1], 1, temperature=0.0, top_k=5, top_p=0.5)
    assert greedy["samplers"] == ["top_k"] and greedy["top_k"] == 1
    assert llamacpp.completion_body([1], 1, temperature=0.0, frequency_penalty=0.1)["samplers"] == ["penalties", "top_k"]
    assert b["min_p"] == 0.0 and b["typical_p"] == 1.0 and b["xtc_probability"] == 0.0 and b["dry_multiplier"] == 0.0
    assert b["n_probs"] == 1 and b["post_sampling_probs"] is False  # raw logits; the sampled token's always
    assert "n_probs" not in llamacpp.completion_body([1], 1) and llamacpp.completion_body([1], 1)["seed"] == -1


class _Served:
    """The app with a LlamaCppEngine in this process, on a loopback socket."""

    def __init__(self, model_dir: Path, gguf: Path, quantize=None, slots: int = 2):
        import uvicorn

        from llmctl.server.app import create_app
        from llmctl.server.llamacpp_engine import LlamaCppEngine
        from llmctl.server.metrics import Metrics
        from llmctl.stages.serve import _bind, _url

        self.engine = LlamaCppEngine(str(model_dir), str(gguf), slots, 16, Metrics(), quantize=quantize)
        self.engine.load()
        sock = _bind("127.0.0.1", 0)
        self.url = _url(sock)
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.engine, "m", 400, None, Metrics()), log_level="warning", lifespan="off"))
        threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        self.engine.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline
            time.sleep(0.01)

    def post(self, **body):
        return httpx.post(self.url + "/v1/completions", json={"model": "m", "temperature": 0, **body}, timeout=120)

    def close(self):
        self.server.should_exit = True
        self.engine.stop()


def _torch_completion(model_dir: Path, **body) -> dict:
    from fastapi.testclient import TestClient

    from llmctl.server.app import create_app
    from llmctl.server.engine import Engine
    from llmctl.server.metrics import Metrics

    e = Engine(str(model_dir), 2, 16, 0, Metrics(), device="cpu", threads=1)
    e.load()
    e.start()
    try:
        with TestClient(create_app(e, "m", 400, None, Metrics())) as c:
            return c.post("/v1/completions", json={"model": "m", "temperature": 0, **body}).json()
    finally:
        e.stop()


def test_engine_through_the_api_matches_the_torch_engine(trained_run, tmp_path, monkeypatch):
    _, _, rd = trained_run
    gguf = tmp_path / "model-f32.gguf"
    gguf.write_bytes(b"GGUF")  # the stand-in decodes the HF model; it only checks the file exists
    log = tmp_path / "requests.jsonl"
    monkeypatch.setenv("LLAMA_CPP_BIN", str(_bin_dir(tmp_path, rd.model_dir, log=log)))
    s = _Served(rd.model_dir, gguf)
    try:
        ours = s.post(prompt="the cat", max_tokens=12, logprobs=2).json()
        ref = _torch_completion(rd.model_dir, prompt="the cat", max_tokens=12, logprobs=2)
        assert ours["choices"][0]["text"] == ref["choices"][0]["text"]
        assert ours["usage"] == ref["usage"]
        # /metrics: llmctl's own, then llama-server's counters: the probe's token, then this answer's
        # (an EOS it stopped at is decoded, not part of the completion)
        metrics = httpx.get(s.url + "/metrics").text
        made = float(re.search(r"^llamacpp:tokens_predicted_total (\S+)$", metrics, re.M).group(1))
        assert made == 1 + ours["usage"]["completion_tokens"] + (ours["choices"][0]["finish_reason"] == "stop")
        assert "llmctl_requests_total" in metrics.split("llamacpp:")[0]
        # one exposition a Prometheus scraper reads whole (prometheus_client's own parser)
        from prometheus_client.parser import text_string_to_metric_families

        names = {f.name for f in text_string_to_metric_families(metrics)}
        assert {"llmctl_requests", "llamacpp:tokens_predicted", "llamacpp:n_decode"} <= names
        a, b = ours["choices"][0]["logprobs"], ref["choices"][0]["logprobs"]
        assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"]
        assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-4)
        # a stop string cuts the text by llmctl's own rule, and the sequence is cancelled upstream
        text = ref["choices"][0]["text"]
        cut = text[len(text) // 2: len(text) // 2 + 2]
        stopped = s.post(prompt="the cat", max_tokens=12, stop=[cut]).json()["choices"][0]
        assert stopped["finish_reason"] == "stop" and stopped["text"] == text[: text.index(cut)]
        # echo with logprobs: a 400 naming why, not a wrong answer
        echo = s.post(prompt="the cat", max_tokens=2, logprobs=1, echo=True)
        assert echo.status_code == 400 and "echo with logprobs" in echo.text
        # streamed: the same text and logprobs, token by token
        with httpx.stream("POST", s.url + "/v1/completions", json={"model": "m", "temperature": 0, "prompt": "the cat", "max_tokens": 12,
                                                                     "logprobs": 2, "stream": True}, timeout=120) as r:
            chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == text
        assert [lp for c in chunks for lp in c["choices"][0]["logprobs"]["token_logprobs"]] == pytest.approx(b["token_logprobs"], abs=1e-4)
        sent = [json.loads(x) for x in log.read_text().splitlines()]
        assert sent[0]["n_predict"] == 1 and sent[0]["n_probs"] >= 1  # the load-time probe
        assert sent[1]["prompt"] == ref_prompt_ids(rd.model_dir, "the cat")
        # A whole answer with nothing to cut is asked for in one piece; a stop string or a
        # streaming client needs the tokens as they come.
        assert [x["stream"] for x in sent[1:]] == [False, True, True]
        # llama-server logs warnings and errors only (at info it logs ~9 lines a request)
        assert {x["_log_verbosity"] for x in sent} == {"2"}
    finally:
        s.close()


def test_a_client_gone_before_a_whole_answer_frees_its_slot(trained_run, tmp_path, monkeypatch):
    """A non-streamed answer is one reply from llama-server; the engine does not wait for it once
    the client has hung up. The stand-in holds its answer (decoded, unsent) until the test lets
    it go, so the hang-up provably lands first, with no timing involved."""
    import socket

    _, _, rd = trained_run
    gguf = tmp_path / "model-f32.gguf"
    gguf.write_bytes(b"GGUF")
    log, hold = tmp_path / "requests.jsonl", tmp_path / "hold"
    monkeypatch.setenv("LLAMA_CPP_BIN", str(_bin_dir(tmp_path, rd.model_dir, log=log, hold=hold)))
    s = _Served(rd.model_dir, gguf)
    try:
        hold.write_text("")
        host, port = s.url.removeprefix("http://").split(":")
        body = json.dumps({"model": "m", "prompt": "the cat", "max_tokens": 8, "temperature": 0}).encode()
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

        def wait(cond, what):
            deadline = time.time() + 60  # a failure bound only: each step waits for an event
            while not cond():
                assert time.time() < deadline, what
                time.sleep(0.01)

        wait(lambda: log.is_file() and len(log.read_text().splitlines()) == 2 and s.engine.running == 1, "the request never reached llama-server")
        sock.close()  # the client is gone while llama-server still holds the answer
        wait(lambda: s.engine.running == 0, "the engine kept waiting for an answer nobody reads")
        assert hold.exists()  # the answer was never let go: the slot was freed by the hang-up
        hold.unlink()
        again = s.post(prompt="the cat", max_tokens=8)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 8
    finally:
        hold.unlink(missing_ok=True)
        s.close()


def test_whole_answers_share_a_kept_alive_connection_that_may_close_when_idle(trained_run, tmp_path, monkeypatch):
    """Whole answers go over one connection kept alive between them (no connect, accept and close
    per request); llama-server closes a connection idle past its keep-alive, and the next request
    goes over a new one instead of failing. A streamed answer gets a connection of its own."""
    _, _, rd = trained_run
    gguf = tmp_path / "model-f32.gguf"
    gguf.write_bytes(b"GGUF")
    log = tmp_path / "requests.jsonl"
    monkeypatch.setenv("LLAMA_CPP_BIN", str(_bin_dir(tmp_path, rd.model_dir, log=log, keepalive=1.0)))
    s = _Served(rd.model_dir, gguf, slots=1)  # one worker: every request on its connection
    try:
        texts = [s.post(prompt="the cat", max_tokens=4).json()["choices"][0]["text"] for _ in range(3)]
        time.sleep(2.5)  # past the stand-in's keep-alive (1 s): it has closed the idle connection
        late = s.post(prompt="the cat", max_tokens=4)
        assert late.status_code == 200, late.text
        with httpx.stream("POST", s.url + "/v1/completions", json={"model": "m", "temperature": 0, "prompt": "the cat", "max_tokens": 4,
                                                                     "stream": True}, timeout=120) as r:
            streamed = "".join(json.loads(x[6:])["choices"][0]["text"] for x in r.iter_lines() if x.startswith("data: {"))
        after = s.post(prompt="the cat", max_tokens=4).json()["choices"][0]["text"]
        assert len(set(texts)) == 1 and late.json()["choices"][0]["text"] == streamed == after == texts[0]
        sent = [json.loads(x) for x in log.read_text().splitlines()][1:]  # after the load-time check
        conns = [x["_conn"] for x in sent]
        assert [x["stream"] for x in sent] == [False, False, False, False, True, False]
        assert conns[0] == conns[1] == conns[2]  # kept alive
        assert conns[3] != conns[2]  # the idle one was closed by the server: a new one, no error
        assert conns[4] not in conns[:4] and conns[5] != conns[4]  # the stream's own, closed after it
    finally:
        s.close()


def ref_prompt_ids(model_dir, text):
    from transformers import AutoTokenizer

    from llmctl.inference.context import encode_one

    return encode_one(AutoTokenizer.from_pretrained(model_dir), text)


def test_a_llama_server_that_computes_something_else_is_refused(trained_run, tmp_path, monkeypatch):
    from llmctl.errors import LlmctlError
    from llmctl.server.llamacpp_engine import LlamaCppEngine
    from llmctl.server.metrics import Metrics

    _, _, rd = trained_run
    gguf = tmp_path / "model-f32.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("LLAMA_CPP_BIN", str(_bin_dir(tmp_path, rd.model_dir, skew=0.5)))
    e = LlamaCppEngine(str(rd.model_dir), str(gguf), 1, 4, Metrics())
    with pytest.raises(LlmctlError, match="differ from the model's own forward"):
        e.load()
    assert not e.server.alive()  # not left running


def test_a_llama_server_that_fails_to_start_says_why(trained_run, tmp_path, monkeypatch):
    from llmctl.errors import LlmctlError

    _, _, rd = trained_run
    monkeypatch.setenv("LLAMA_CPP_BIN", str(_bin_dir(tmp_path, rd.model_dir)))
    s = llamacpp.LlamaServer(tmp_path / "absent.gguf", 1, 64)
    with pytest.raises(LlmctlError, match="exited with code 1 .*failed to open"):
        s.start()


def test_a_failed_start_names_the_first_error_llama_cpp_logged():
    """llama.cpp logs the cause first, then that it gives up; the message names the cause."""
    s = llamacpp.LlamaServer(Path("bad.gguf"), 1, 64, binary=Path("/bin/true"))
    s.log.extend([
        "0.00.005.690 W warming up",
        "0.00.005.712 E gguf_init_from_reader: invalid magic characters: 'garb', expected 'GGUF'",
        "0.00.005.719 E llama_model_load: error loading model: llama_model_loader: failed to load model from bad.gguf",
        "0.00.005.722 E srv    load_model: failed to load model, 'bad.gguf'",
        "0.00.006.046 E srv  llama_server: exiting due to model loading error",
    ])
    assert s.last_error() == "gguf_init_from_reader: invalid magic characters: 'garb', expected 'GGUF'"
    plain = llamacpp.LlamaServer(Path("x.gguf"), 1, 64, binary=Path("/bin/true"))
    plain.log.extend(["main: loading", "error: failed to open x.gguf", "main: bye"])  # no level prefix (older builds)
    assert plain.last_error() == "error: failed to open x.gguf"
    assert llamacpp.LlamaServer(Path("x.gguf"), 1, 64, binary=Path("/bin/true")).last_error() == "(no output)"


LLAMA_SERVER = llamacpp.find_binary("llama-server")


@pytest.mark.skipif(LLAMA_SERVER is None or os.environ.get("LLMCTL_TEST_REAL_LLAMA") == "0", reason="llama.cpp's llama-server not installed")
def test_real_llama_server_serves_the_exported_gguf(trained_run):
    path, cfg, rd = trained_run
    r = invoke_cli("export", str(path), "--set", "export.formats=[hf, gguf]", "--set", "export.gguf_types=[f32]")
    assert r.returncode == 0, r.stderr
    s = _Served(rd.export_dir("hf"), rd.export_dir("gguf") / "model-f32.gguf")
    try:
        ours = s.post(prompt="the cat sat", max_tokens=16, logprobs=1).json()
        ref = _torch_completion(rd.export_dir("hf"), prompt="the cat sat", max_tokens=16, logprobs=1)
        assert ours["choices"][0]["text"] == ref["choices"][0]["text"]
        assert ours["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(ref["choices"][0]["logprobs"]["token_logprobs"], abs=1e-3)
        metrics = httpx.get(s.url + "/metrics").text  # llama-server's own counters follow llmctl's
        assert float(re.search(r"^llamacpp:n_decode_total (\S+)$", metrics, re.M).group(1)) >= ours["usage"]["completion_tokens"]
    finally:
        s.close()


@pytest.mark.skipif(LLAMA_SERVER is None or os.environ.get("LLMCTL_TEST_REAL_LLAMA") == "0", reason="llama.cpp's llama-server not installed")
def test_real_llama_server_that_cannot_load_a_file_says_why(tmp_path):
    from llmctl.errors import LlmctlError

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(LlmctlError, match=r"exited with code \d+ while loading .*model.gguf: .*invalid magic"):
        llamacpp.LlamaServer(bad, 1, 64).start()


# --------------------------------------------------------------------------- generate.engine llama.cpp
def _outputs(rd, stage="generate") -> list[dict]:
    return [json.loads(x) for x in (rd.stage_dir(stage) / "outputs.jsonl").read_text().splitlines()]


def _export_gguf(path, rd) -> None:
    """The run's config asks for an f32 GGUF (so later stages find the export up to date), then exports."""
    import yaml

    d = yaml.safe_load(Path(path).read_text())
    d.setdefault("export", {}).update(formats=["hf", "gguf"], gguf_types=["f32"])
    Path(path).write_text(yaml.safe_dump(d))
    r = invoke_cli("export", str(path))
    assert r.returncode == 0, r.stderr


def test_generate_engine_llama_cpp_gives_the_torch_engines_outputs(trained_run, tmp_path, monkeypatch):
    """Greedy: the same texts, finish reasons and token counts as the torch path, for several
    prompts at once (two slots), a stop string (cut by generate's rule, the sequence ended
    upstream), two return sequences, and logprobs (entropy null: llama.cpp gives no whole distribution)."""
    path, _, rd = trained_run
    _export_gguf(path, rd)
    log = tmp_path / "requests.jsonl"
    monkeypatch.setenv("LLAMA_CPP_BIN", str(_bin_dir(tmp_path, rd.export_dir("hf"), log=log)))
    prompts = ["-p", "the cat", "-p", "a dog sat on", "-p", "the"]
    common = ["--set", "generate.max_new_tokens=10", "--set", "generate.batch_size=2", "--set", "generate.do_sample=false", "--json"]
    ref = invoke_cli("generate", str(path), *prompts, *common, "--logprobs", "2")
    assert ref.returncode == 0, ref.stderr
    want = _outputs(rd)
    got = invoke_cli("generate", str(path), *prompts, *common, "--logprobs", "2", "--set", "generate.engine=llama.cpp")
    assert got.returncode == 0, got.stderr
    assert "llama.cpp (model-f32.gguf)" in json.loads(got.stdout)["engine"]
    outs = _outputs(rd)
    keys = ("index", "output", "finish_reason", "prompt_tokens", "completion_tokens")
    assert [{k: o[k] for k in keys} for o in outs] == [{k: o[k] for k in keys} for o in want]
    sent = [json.loads(x) for x in log.read_text().splitlines()]
    assert sent[0]["n_predict"] == 1  # the check at start
    assert sorted(x["prompt"] for x in sent[1:]) == sorted(ref_prompt_ids(rd.export_dir("hf"), p) for p in prompts[1::2])
    assert {x["samplers"][0] for x in sent[1:]} == {"top_k"} and all(x["top_k"] == 1 for x in sent[1:])  # greedy
    # logprobs: llama.cpp's (raw logits) for each token and its top alternatives; no entropy
    for o, w in zip(outs, want):
        lps, ref_lps = o["logprobs"], w["logprobs"]
        assert [(x["token"], x["id"]) for x in lps] == [(x["token"], x["id"]) for x in ref_lps]
        assert [x["logprob"] for x in lps] == pytest.approx([x["logprob"] for x in ref_lps], abs=1e-4)
        assert [[a["id"] for a in x["top"]] for x in lps] == [[a["id"] for a in x["top"]] for x in ref_lps]
        assert all(x["entropy"] is None for x in lps) and all(x["entropy"] is not None for x in ref_lps)

    # a stop string, two return sequences each
    text = max((o["output"] for o in want), key=len)
    at = next(i for i in range(len(text) // 2, 0, -1) if text.index(text[i:i + 2]) == i)  # a cut that leaves some text
    cut = text[at:at + 2]
    which = prompts[1::2][[o["output"] for o in want].index(text)]
    stop = ["--set", f"generate.stop=[{json.dumps(cut)}]", "--set", "generate.num_return_sequences=2"]
    got = invoke_cli("generate", str(path), "-p", which, *common, *stop, "--set", "generate.engine=llama.cpp")
    assert got.returncode == 0, got.stderr
    assert [(o["finish_reason"], o["output"]) for o in _outputs(rd)] == [("stop", text[: text.index(cut)])] * 2  # greedy: both the same
    # --surprisal shows each token's logprob (and no entropy: a dash)
    got = invoke_cli("generate", str(path), "-p", "the cat", "--surprisal", *common[:-1], "--set", "generate.engine=llama.cpp")
    assert got.returncode == 0, got.stderr
    assert all(repr(x["token"]) in got.stdout for x in outs[0]["logprobs"]) and outs[0]["logprobs"]


def test_generate_engine_llama_cpp_needs_the_gguf_and_llama_server(trained_run, tmp_path, monkeypatch, no_llama_cpp):
    path, _, rd = trained_run
    r = invoke_cli("generate", str(path), "-p", "x", "--set", "generate.engine=llama.cpp")
    assert r.returncode == 2 and "no llama-server found" in r.stderr and "generate.engine" in r.stderr, r.stderr
    monkeypatch.setenv("LLAMA_CPP_BIN", str(_bin_dir(tmp_path)))
    r = invoke_cli("generate", str(path), "-p", "x", "--set", "generate.engine=llama.cpp", "--set", "generate.quantize=int8")
    assert r.returncode == 3 and "model-q8_0.gguf is missing" in r.stderr and "llmctl export" in r.stderr, r.stderr


@pytest.mark.skipif(LLAMA_SERVER is None or os.environ.get("LLMCTL_TEST_REAL_LLAMA") == "0", reason="llama.cpp's llama-server not installed")
def test_generate_on_the_real_llama_server_matches_torch(trained_run):
    path, _, rd = trained_run
    _export_gguf(path, rd)
    args = ["-p", "the cat sat", "-p", "a dog", "--set", "generate.max_new_tokens=16", "--set", "generate.do_sample=false", "--json"]
    ref = invoke_cli("generate", str(path), *args)
    assert ref.returncode == 0, ref.stderr
    want = [o["output"] for o in _outputs(rd)]
    got = invoke_cli("generate", str(path), *args, "--set", "generate.engine=llama.cpp")
    assert got.returncode == 0, got.stderr
    assert [o["output"] for o in _outputs(rd)] == want


def test_run_exports_before_generating_with_llama_cpp(trained_run, tmp_path, monkeypatch):
    """`llmctl run` with generate.engine llama.cpp: generate reads the GGUF export, so export runs first
    (`--from eval --to generate` included); with the torch engine the order stays prepare, train, eval, generate, export."""
    import yaml

    from llmctl.config import load_config
    from llmctl.pipeline import in_order

    path, _, rd = trained_run
    d = yaml.safe_load(Path(path).read_text())
    d.setdefault("export", {}).update(formats=["hf", "gguf"], gguf_types=["f32"])
    d.setdefault("generate", {}).update(engine="llama.cpp", prompts=["the cat"], max_new_tokens=4)
    d.setdefault("eval", {}).update(generation=False, hardest=0)
    Path(path).write_text(yaml.safe_dump(d))
    monkeypatch.setenv("LLAMA_CPP_BIN", str(_bin_dir(tmp_path, rd.model_dir)))
    r = invoke_cli("run", str(path), "--from", "eval", "--to", "generate", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ran"][-2:] == ["export", "generate"], out["ran"]
    assert rd.manifest("generate")["headline"]["engine"] == "llama.cpp (model-f32.gguf)"
    stages = ("prepare", "train", "eval", "generate", "export")
    d["generate"]["engine"] = "torch"
    Path(path).write_text(yaml.safe_dump(d))
    assert in_order(load_config(path), stages) == list(stages)


def test_cancelling_a_job_hangs_up_its_llama_server_connection_at_once():
    """The engine's thread waits on llama-server's answer with a plain blocking read (no
    polling); cancelling the job from another thread shuts the connection down: the read
    returns, and llama-server (here a socket that never answers) sees the connection close."""
    import http.client
    import socket
    import threading

    from llmctl.inference.llamacpp import answer_tokens, completion_body, hang_up, post_completion
    from llmctl.server.engine import Job

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    seen: list[bytes] = []
    asked = threading.Event()

    def never_answers():
        c, _ = srv.accept()
        data = b""
        while chunk := c.recv(65536):  # ends only when the engine's side closes
            data += chunk
            if b"n_predict" in data:
                asked.set()  # the whole request is here
        seen.append(data)
        c.close()

    peer = threading.Thread(target=never_answers, daemon=True)
    peer.start()
    j = Job(prompt_ids=[1, 2, 3], max_tokens=4, stream=False)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.connect()
    j.when_cancelled(lambda: hang_up(conn))
    ended: list = []

    def engine_thread():
        try:
            ended.append(answer_tokens(json.loads(post_completion(conn, completion_body(j.prompt_ids, 4, stream=False)).read())))
        except (OSError, http.client.HTTPException) as e:
            ended.append(type(e).__name__)

    t = threading.Thread(target=engine_thread, daemon=True)
    t.start()
    assert asked.wait(30), "the request never arrived"
    j.cancelled = True  # the engine's thread is now waiting for an answer that never comes
    t.join(30)
    peer.join(30)
    assert not t.is_alive() and ended, "the blocked read did not return on cancel"
    assert seen and b"/completion" in seen[0], "llama-server never saw the connection close"
    srv.close()
    # registered after the cancel: the hook runs at once
    calls: list = []
    j.when_cancelled(lambda: calls.append(1))
    assert calls == [1]
    j.when_cancelled(None)
