"""One BOS rule (llmctl.tokenizer.wants_bos) for training rows, generate, eval and serve: a
tokenizer that prepends BOS on its own (a hub Llama or Mistral) gets it everywhere, one that
does not (llmctl's own) nowhere."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from conftest import sentences, train_tiny_tokenizer

pytest.importorskip("fastapi")


@pytest.fixture(scope="module", params=[False, True], ids=["no-bos", "bos"])
def model_dir(request, tmp_path_factory):
    """A tiny llama and its tokenizer, which prepends BOS (add_bos_token) or not."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("bos" if request.param else "nobos")
    train_tiny_tokenizer(sentences(60, seed=3), d)
    tok = AutoTokenizer.from_pretrained(d, add_bos_token=request.param)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=128, initializer_range=0.3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d, request.param


def _tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir[0])


def test_the_rule_follows_what_the_tokenizer_does(model_dir):
    from llmctl.tokenizer import score_prefix, wants_bos, with_bos

    tok, want = _tok(model_dir), model_dir[1]
    assert wants_bos(tok) is want  # after a save and reload (the attribute itself reloads as False)
    plain = tok("the cat", add_special_tokens=False)["input_ids"]
    assert with_bos(tok, plain) == tok("the cat")["input_ids"] == [tok.bos_token_id] * want + plain
    assert with_bos(tok, with_bos(tok, plain)) == with_bos(tok, plain)  # never twice
    assert score_prefix(tok) == tok.bos_token_id


def test_llmctl_trained_tokenizers_add_no_bos():
    from llmctl.tokenizer import train_tokenizer, wants_bos

    t = SimpleNamespace(eos_token="<|endoftext|>", bos_token="<|bos|>", pad_token="<|pad|>", extra_special_tokens=[], vocab_size=300,
                        min_frequency=1)
    tok = train_tokenizer(sentences(40), SimpleNamespace(tokenizer=t))
    assert tok.bos_token_id is not None and not wants_bos(tok)


def test_training_rows_start_documents_prompts_and_chats_with_bos(model_dir):
    from llmctl.data.formats import encode_chat, encode_pairs, pack_text
    from llmctl.tokenizer import DEFAULT_CHAT_TEMPLATE

    tok, want = _tok(model_dir), model_dir[1]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    docs = ["the quick brown fox", "a lazy dog", "river stones glow"]
    stats = {k: 0 for k in ("documents", "bytes", "tokens", "kept_tokens", "dropped_tokens")}
    stream = [t for row in pack_text(docs, tok, 4, eos, stats) for t in row["input_ids"]]
    plain = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    expect = [t for ids in plain for t in [bos] * want + ids + [eos]]
    assert stream == expect[: len(stream)] and stats["tokens"] == len(expect)
    rows = encode_pairs({"prompt": ["the quick brown fox jumps", "river"], "completion": [" over", " stones"]}, tok, 6, eos)
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        assert (ids[0] == bos) is want and labels[0] == -100
    assert rows["_truncated"][0] == 1 and len(rows["input_ids"][0]) == 6  # cut from the left, after the BOS
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    for template in (DEFAULT_CHAT_TEMPLATE, "{{ bos_token }}" + DEFAULT_CHAT_TEMPLATE):  # one that writes BOS itself
        tok.chat_template = template
        ids = encode_chat({"messages": [msgs]}, tok, 64)["input_ids"][0]
        assert ids.count(bos) == (1 if want or template.startswith("{{ bos") else 0) and (ids[0] == bos) == (ids.count(bos) == 1)


def test_generate_eval_and_serve_see_the_same_prompt(model_dir, monkeypatch):
    """generate feeds the prompt the BOS rule gives (BOS kept when a long prompt is cut);
    serve counts the same prompt tokens and decodes the same tokens; its echo logprobs leave
    the BOS out and score the first token after BOS as eval does (with a BOS tokenizer every
    token has eval's context, so they sum to eval's log-likelihood)."""
    import torch
    from starlette.testclient import TestClient

    from llmctl.generation import Sampling, generate_batch
    from llmctl.inference.context import fit_to_context
    from llmctl.metrics import rolling_nll
    from llmctl.server.app import create_app
    from llmctl.server.engine import Engine
    from llmctl.server.metrics import Metrics
    from llmctl.tokenizer import score_prefix

    d, want = model_dir
    text = "the quick brown fox"
    threads = torch.get_num_threads()
    metrics = Metrics()
    engine = Engine(str(d), 4, 64, 0, metrics, device="cpu", threads=1)
    engine.start()
    try:
        assert engine.ready.wait(60), engine.error
        model, tok = engine.model, engine.tok
        plain = tok(text, add_special_tokens=False)["input_ids"]
        gen = generate_batch(model, tok, [text], Sampling(max_new_tokens=5))[0]
        assert gen["prompt_tokens"] == len(plain) + want
        ids = [tok.bos_token_id] * want + plain
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        assert gen["token_ids"] == ref
        assert fit_to_context([ids], 2, 4, bos=tok.bos_token_id if want else None)[0][0] == ids[:want] + ids[len(ids) - 2 + want :]
        with TestClient(create_app(engine, "m", 8, None, metrics)) as c:
            r = c.post("/v1/completions", json={"model": "m", "prompt": text, "max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 0})
        body = r.json()
        assert r.status_code == 200, body
        assert body["usage"]["prompt_tokens"] == len(plain) + want
        assert body["choices"][0]["text"] == text + gen["text"]
        lp = body["choices"][0]["logprobs"]
        assert lp["tokens"][: len(plain)] == [tok.decode([t]) for t in plain]  # no BOS among the echoed tokens
        with torch.no_grad():
            after = torch.log_softmax(model(torch.tensor([[score_prefix(tok)]])).logits[0, -1].float(), -1)
        assert lp["token_logprobs"][0] == pytest.approx(float(after[plain[0]]), abs=1e-4)
        if want:  # the prompt the model saw is eval's [BOS] + text: the same numbers
            nll, count = rolling_nll(model, [plain], score_prefix(tok), 64, 64)
            assert count == len(plain) and -sum(lp["token_logprobs"][: len(plain)]) == pytest.approx(nll, abs=1e-3)
    finally:
        engine.stop()
        torch.set_num_threads(threads)


def test_explain_attributes_the_prompt_the_model_sees(model_dir):
    """explain feeds the prompt as generate does: BOS first exactly when the rule says so, and
    the next token it explains is generate's greedy first token."""
    import torch

    from llmctl.generation import Sampling, generate_batch
    from llmctl.modeling import load_for_inference
    from llmctl.stages.explain import attribute

    d, want = model_dir
    model, tok = load_for_inference(str(d))
    text = "the quick brown fox"
    out = attribute(model, tok, text)
    plain = tok(text, add_special_tokens=False)["input_ids"]
    ids = [tok.bos_token_id] * want + plain
    assert [t["id"] for t in out["tokens"]] == ids
    with torch.no_grad():
        first = generate_batch(model, tok, [text], Sampling(max_new_tokens=1))[0]["token_ids"][0]
    assert out["target_ids"] == [first]
