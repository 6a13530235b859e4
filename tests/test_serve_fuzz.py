"""No request body gives a 5xx: client mistakes are OpenAI-shaped 4xx (a small, bounded fuzz)."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    import torch
    from starlette.testclient import TestClient
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import sentences, train_tiny_tokenizer
    from llmctl.server.app import create_app
    from llmctl.server.engine import Engine
    from llmctl.server.metrics import Metrics

    d = tmp_path_factory.mktemp("fuzz-model")
    tok = train_tiny_tokenizer(sentences(40, seed=3), d)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=64, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(d)
    threads = torch.get_num_threads()
    metrics = Metrics()
    engine = Engine(str(d), 4, 64, 0, metrics, device="cpu", threads=1)
    engine.start()
    assert engine.ready.wait(60), engine.error
    with TestClient(create_app(engine, "m", 4, None, metrics), raise_server_exceptions=False) as c:
        yield c
    engine.stop()
    torch.set_num_threads(threads)


def _ok_shape(r):
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"model": "m", "prompt": "\ud800", "max_tokens": 2}, None),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi \udfff"}], "max_tokens": 2}, None),
    ("/v1/completions", {"model": "m", "prompt": "hi", "stop": ["\ud83d"], "max_tokens": 2}, None),
    ("/v1/completions", {"model": "m", "prompt": "hi", "seed": 2**80, "max_tokens": 2}, "seed"),
    ("/v1/completions", {"model": "m", "prompt": "hi", "seed": -(2**70), "max_tokens": 2}, "seed"),
])
def test_client_mistakes_are_openai_shaped_400s(client, path, body, param):
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, (r.status_code, r.text)
    _ok_shape(r)
    if param:
        assert r.json()["error"]["param"] == param


def test_seed_at_the_edges_of_int64_works(client):
    for seed in (2**63 - 1, -(2**63), 0):
        r = client.post("/v1/completions", json={"model": "m", "prompt": "the quick", "seed": seed, "n": 2, "max_tokens": 2, "temperature": 1.0})
        assert r.status_code == 200, r.text


def test_top_k_and_repetition_penalty_reach_the_sampler(client):
    """vLLM's extra sampling fields: top_k 1 samples the greedy text whatever the temperature
    and seed; out-of-range values are 400s naming the field."""
    body = {"model": "m", "prompt": "the quick", "max_tokens": 4}
    greedy = client.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    for seed in range(3):
        r = client.post("/v1/completions", json={**body, "temperature": 2.0, "top_k": 1, "seed": seed, "repetition_penalty": 1.0})
        assert r.json()["choices"][0]["text"] == greedy
    sampled = {client.post("/v1/completions", json={**body, "temperature": 2.0, "seed": seed}).json()["choices"][0]["text"] for seed in range(3)}
    assert sampled != {greedy}  # without top_k these settings do sample
    for field, bad in (("top_k", -2), ("repetition_penalty", 0)):
        r = client.post("/v1/completions", json={**body, field: bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def _weird(rng: random.Random, depth: int = 0):
    pool = [
        None, True, False, 0, -1, 1, 2**80, -(2**80), 1e308, -1e-308, 0.5, 3, 17, "", "m", "x" * 300, "\ud800", "\udfff\ud800", "é\u0000",
        "<|endoftext|>", [], {}, [1, 2, 3], [2**40], [[1, 2], [3]], [[]], ["a", "\ud800"], {"type": "text", "text": "\ud800"},
    ]
    if depth < 2 and rng.random() < 0.3:
        return [_weird(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 2 and rng.random() < 0.2:
        return {rng.choice(["role", "content", "type", "text", "include_usage"]): _weird(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice(pool)


FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
          "stream_options", "presence_penalty", "frequency_penalty", "top_k", "repetition_penalty", "user", "logprobs", "logit_bias", "echo", "suffix", "best_of"]


def test_fuzz_no_body_gives_a_5xx(client):
    rng = random.Random(1234)
    base = {
        "/v1/completions": {"model": "m", "prompt": "the quick", "max_tokens": 2},
        "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "the quick"}], "max_tokens": 2},
    }
    seen = {}
    for i in range(250):
        path = rng.choice(list(base))
        body = dict(base[path])
        for _ in range(rng.randint(1, 3)):
            k = rng.choice(FIELDS)
            if rng.random() < 0.15:
                body.pop(k, None)
            else:
                body[k] = _weird(rng)
        if rng.random() < 0.1:
            raw = rng.choice([b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"model": "m", "prompt": NaN}', b'{"prompt": "\\ud800"'])
        else:
            raw = json.dumps(body).encode()
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code < 500, (i, path, raw[:300], r.status_code, r.text[:300])
        if r.status_code >= 400:
            _ok_shape(r)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
    assert seen.get(200, 0) > 5 and seen.get(400, 0) > 50, seen  # the fuzz reaches both outcomes
