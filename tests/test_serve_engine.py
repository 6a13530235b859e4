"""The continuous-batching engine alone (no HTTP): batched output equals output alone.

The models here are random but "sharp" (large weights), so the next token depends on the
whole context: a wrong position id, a misaligned cache row or a leaked padding column
changes the text.
"""

from __future__ import annotations

import queue
import threading
import time

import pytest

from conftest import sentences, train_tiny_tokenizer

PROMPTS = ["the quick", "seven wizards quietly judge", "river", "a lazy dog jumps over the old bridges", "pale moon", "fox", "near old stones glow", "matches and"]
MAX_TOKENS = [20, 5, 33, 12, 40, 7, 25, 16]


@pytest.fixture(autouse=True, scope="module")
def _keep_torch_threads():
    """Engines set torch's (process-wide) thread count; give other test modules theirs back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class _Loop:
    """Stands in for the asyncio loop: the engine thread delivers straight into a Queue."""

    def call_soon_threadsafe(self, fn, item):
        fn(item)


class _Out(queue.Queue):
    def put_nowait(self, item):
        self.put(item)


class _Metrics:
    def __init__(self):
        self.tokens = 0
        self.running = 0

    def add_tokens(self, n):
        self.tokens += n

    def add_forward(self):
        pass

    def set_queue(self, n):
        pass

    def set_running(self, n):
        self.running = n


def _sharp_model(out, arch: str):
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = train_tiny_tokenizer(sentences(200, seed=3), out, vocab_size=300)
    torch.manual_seed(0)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, vocab_size=len(tok))
    if arch == "llama":
        # grouped-query attention (2 heads, 1 kv head) on purpose
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          max_position_embeddings=256, initializer_range=0.35, **ids)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256, initializer_range=0.35, **ids)
        model = GPT2LMHeadModel(cfg)
    model.save_pretrained(out)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_dir(request, tmp_path_factory):
    return _sharp_model(tmp_path_factory.mktemp(f"sharp-{request.param}"), request.param)


def _engine(path, **kw):
    from llmctl.server.engine import Engine

    args = dict(max_batch_size=8, max_queue=64, batch_wait_ms=5, metrics=_Metrics(), device="cpu", threads=1)
    args.update(kw)
    e = Engine(str(path), args.pop("max_batch_size"), args.pop("max_queue"), args.pop("batch_wait_ms"), args.pop("metrics"), **args)
    e.start()
    assert e.ready.wait(60), e.error
    return e


def _job(e, prompt, max_tokens, **kw):
    from llmctl.server.engine import Job

    ids = e.tok(prompt, add_special_tokens=False)["input_ids"]
    return Job(ids, max_tokens, loop=_Loop(), out=_Out(), **{"temperature": 0.0, **kw})


def _collect(j, timeout=60):
    parts = []
    while True:
        item = j.out.get(timeout=timeout)
        if item[0] == "delta":
            parts.append(item[1])
        elif item[0] == "done":
            return "".join(parts), item[1], item[2]
        else:
            raise AssertionError(item)


def _alone(e, prompts, max_tokens, **kw):
    out = []
    for p, mt in zip(prompts, max_tokens):
        j = _job(e, p, mt, **kw)
        e.submit([j])
        out.append(_collect(j))
    return out


def _submit_during_decode(e, monkeypatch, at_step: dict[int, list]) -> list[tuple[int, list]]:
    """Submit jobs from inside the engine thread right after decode step N of a running batch.

    No sleeps: each job is in the queue while the batch is decoding, whatever the machine's
    speed. Returns the merges the engine made: (rows already running, jobs that joined).
    """
    real_step, real_merge = e._step, e._merge
    merges: list[tuple[int, list]] = []
    done = [0]

    def step(batch):
        out = real_step(batch)
        done[0] += 1
        for j in at_step.pop(done[0], []):
            e.submit([j])
        return out

    def merge(a, b):
        merges.append((len(a), list(b.jobs)))
        return real_merge(a, b)

    monkeypatch.setattr(e, "_step", step)
    monkeypatch.setattr(e, "_merge", merge)
    return merges


def test_greedy_batched_and_joining_mid_decode_equals_alone(model_dir, monkeypatch):
    e = _engine(model_dir)
    try:
        alone = _alone(e, PROMPTS, MAX_TOKENS)
        steps_alone = e.steps
        assert len({a[0] for a in alone}) == len(alone)  # the model really depends on its prompt
        # The longest sequence starts alone; each other one arrives one decode step later and
        # joins the running batch, with shorter and longer prompts than the rows already there.
        first = max(range(len(PROMPTS)), key=lambda i: alone[i][2])
        assert alone[first][2] > len(PROMPTS)  # still decoding when the last one arrives
        e.steps = 0
        jobs = [_job(e, p, mt) for p, mt in zip(PROMPTS, MAX_TOKENS)]
        later = [j for i, j in enumerate(jobs) if i != first]
        merges = _submit_during_decode(e, monkeypatch, {k + 1: [j] for k, j in enumerate(later)})
        e.submit([jobs[first]])
        together = [_collect(j) for j in jobs]
        assert together == alone
        joined = [j for _, js in merges for j in js]
        assert sorted(map(id, joined)) == sorted(map(id, later))  # every later row joined a running batch
        assert all(running >= 1 for running, _ in merges)
        assert max(running for running, _ in merges) >= 3  # rows joined a batch of several
        assert e.steps < steps_alone / 2  # forward passes were shared
    finally:
        e.stop()


def test_logprobs_of_rows_that_ask_equal_alone_and_in_a_mixed_batch(tmp_path):
    """Rows with logprobs (top 0 and top 2) decoded together with a row without: each row's
    entries equal what it gets alone, and top K has K alternatives."""
    e = _engine(_sharp_model(tmp_path, "llama"))
    try:
        asks = [0, 2, None]
        alone = []
        for p, k in zip(PROMPTS[:3], asks):
            j = _job(e, p, 6, logprobs=k)
            e.submit([j])
            _collect(j)
            alone.append(j.lps)
        jobs = [_job(e, p, 6, logprobs=k) for p, k in zip(PROMPTS[:3], asks)]
        e.submit(jobs)
        for j in jobs:
            _collect(j)
        assert alone[2] == [] and jobs[2].lps == []
        for j, ref, k in zip(jobs[:2], alone[:2], asks[:2]):
            assert len(j.lps) == len(ref) == len(j.tokens) > 0
            for (lp, top), (lp_ref, top_ref) in zip(j.lps, ref):
                assert lp == pytest.approx(lp_ref, abs=1e-4) and lp <= 0
                assert len(top) == k and [t for t, _ in top] == [t for t, _ in top_ref]
                assert all(isinstance(t, int) for t, _ in top)
    finally:
        e.stop()


def test_lean_forward_serves_what_transformers_serves(tmp_path, monkeypatch):
    """The engine on the lean forward pass (llmctl/inference/lean.py) gives, token for token, what it
    gives on transformers' forward: batched, joined mid-decode, with sampling and echo logprobs."""
    path = _sharp_model(tmp_path, "llama")
    outs = {}
    for lean in ("1", "0"):
        monkeypatch.setenv("LLMCTL_LEAN", lean)
        e = _engine(path)
        try:
            assert (e.lean is not None) == (lean == "1")
            jobs = [_job(e, p, mt, **({"temperature": 0.9, "seed": i} if i % 2 else {})) for i, (p, mt) in enumerate(zip(PROMPTS, MAX_TOKENS))]
            echo = _job(e, PROMPTS[1], 4, logprobs=2, echo_logprobs=True)
            with monkeypatch.context() as m:
                _submit_during_decode(e, m, {k + 1: [j] for k, j in enumerate(jobs[1:] + [echo])})
                e.submit([jobs[0]])
                texts = [_collect(j) for j in jobs + [echo]]
            outs[lean] = (texts, [(t, lp) for t, lp, *_ in echo.prompt_lps[1:]])
        finally:
            e.stop()
    assert outs["1"][0] == outs["0"][0]
    (lean_lps, hf_lps) = outs["1"][1], outs["0"][1]
    assert [t for t, _ in lean_lps] == [t for t, _ in hf_lps]
    assert max(abs(a - b) for (_, a), (_, b) in zip(lean_lps, hf_lps)) < 1e-3  # float rounding only


def test_seeded_sampling_is_the_same_alone_and_batched(model_dir):
    e = _engine(model_dir)
    try:
        kw = dict(temperature=0.9, top_p=0.9)
        alone = [_alone(e, [p], [12], seed=100 + i, **kw)[0] for i, p in enumerate(PROMPTS[:4])]
        jobs = [_job(e, p, 12, seed=100 + i, **kw) for i, p in enumerate(PROMPTS[:4])]
        e.submit(jobs)
        assert [_collect(j) for j in jobs] == alone
        other = _alone(e, [PROMPTS[0]], [12], seed=7, **kw)[0]
        assert other[0] != alone[0][0]  # a different seed samples differently
    finally:
        e.stop()


SETTINGS = [
    dict(temperature=0.0, repetition_penalty=1.3),
    dict(temperature=0.9, top_k=20, top_p=0.9, seed=3),
    dict(temperature=1.3, top_p=0.8, repetition_penalty=1.2, seed=11),
    dict(temperature=0.7, top_k=5, presence_penalty=0.5, frequency_penalty=0.3, seed=5),
    dict(temperature=1.0, seed=2**64 - 1),  # choice 1 wraps around to seed 0
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_generate_and_serve_sample_the_same_tokens(model_dir, settings):
    """One sampler: `generate` (batched, left-padded, two sequences per prompt) and the serve
    engine (continuous batching, a request with n=2 per prompt) give the same tokens for the
    same prompts, seed and settings."""
    from llmctl.generation import Sampling, generate_batch

    e = _engine(model_dir)
    try:
        prompts = PROMPTS[:3]
        t = settings["temperature"]
        sp = Sampling(max_new_tokens=12, do_sample=t > 0, num_return_sequences=2,
                      **{"top_k": 0, **{k: v for k, v in settings.items() if k != "temperature" or t > 0}})
        gen = [r["token_ids"] for r in generate_batch(e.model, e.tok, prompts, sp)]
        seed = settings.get("seed")
        jobs = [_job(e, p, 12, **{**settings, "seed": None if seed is None else (seed + k) % 2**64}) for p in prompts for k in range(2)]
        e.submit(jobs)
        for j in jobs:
            _collect(j)
        assert [j.tokens for j in jobs] == gen
        assert len({tuple(g) for g in gen}) == (3 if t == 0 else 6)  # the prompts matter, and when sampling the seeds
    finally:
        e.stop()


def test_batch_at_a_time_fallback_gives_the_same_text(model_dir, monkeypatch):
    """Caches that cannot be merged row-wise (e.g. sliding windows) still decode correctly."""
    e = _engine(model_dir)
    try:
        alone = _alone(e, PROMPTS[:4], MAX_TOKENS[:4])
        monkeypatch.setattr(e, "_mergeable", lambda batch: False)
        jobs = [_job(e, p, mt) for p, mt in zip(PROMPTS[:4], MAX_TOKENS[:4])]
        merges = _submit_during_decode(e, monkeypatch, {1: [jobs[1]], 2: [jobs[2]], 3: [jobs[3]]})
        e.submit([jobs[0]])
        assert [_collect(j) for j in jobs] == alone
        assert merges == []  # they arrived mid-decode and waited for the batch to drain
    finally:
        e.stop()


def test_stop_strings_eos_and_penalties(tmp_path):
    path = _sharp_model(tmp_path / "m", "llama")
    e = _engine(path)
    try:
        full, reason, n = _alone(e, ["the quick"], [30])[0]
        assert reason == "length" and n == 30
        stop = full[6:9]
        j = _job(e, "the quick", 30, stop=["zzzz", stop])
        e.submit([j])
        deltas = []
        while True:
            item = j.out.get(timeout=30)
            if item[0] != "delta":
                break
            deltas.append(item[1])
        text = "".join(deltas)
        assert item[:2] == ("done", "stop") and text == full[: full.find(stop)] and stop not in text
        # EOS: make the 4th greedy token the model's end token.
        j = _job(e, "the quick", 30)
        e.submit([j])
        _collect(j)
        e.eos_ids = {j.tokens[3]}
        text, reason, n = _alone(e, ["the quick"], [30])[0]
        assert (reason, n) == ("stop", j.tokens.index(j.tokens[3])) and full.startswith(text)
        e.eos_ids = set()
        # A strong frequency penalty forbids repeating a token.
        import torch

        with torch.no_grad():
            e.model.lm_head.weight.mul_(0.01)  # flatten the logits so the penalty dominates
        j = _job(e, "the quick", 25, frequency_penalty=2.0, presence_penalty=2.0, logprobs=0)
        e.submit([j])
        _collect(j)
        assert len(set(j.tokens)) == len(j.tokens)
        # ... and the engine decoded with the flattened weights (not a copy folded before the
        # change): its logprobs (raw logits, before penalties) are the changed model's.
        with torch.no_grad():
            ref = torch.log_softmax(e.model(torch.tensor([j.prompt_ids])).logits[0, -1].float(), dim=-1)
        assert j.lps[0][0] == pytest.approx(float(ref[j.tokens[0]]), abs=1e-4)
    finally:
        e.stop()


def test_cancelled_sequence_leaves_the_batch_and_frees_its_slot(tmp_path):
    path = _sharp_model(tmp_path / "m", "llama")
    metrics = _Metrics()
    e = _engine(path, max_batch_size=1, metrics=metrics)
    try:
        long = _job(e, "the quick", 200)
        e.submit([long])
        assert long.out.get(timeout=30)[0] == "delta"
        waiting = _job(e, "fox", 5)
        e.submit([waiting])
        long.cancelled = True  # what the app does when the client disconnects
        assert _collect(waiting)[1:] == ("length", 5)
        assert len(long.tokens) < 200 and metrics.tokens < 200
        deadline = time.time() + 10
        while metrics.running and time.time() < deadline:
            time.sleep(0.01)
        assert metrics.running == 0
    finally:
        e.stop()


def test_queue_bound_and_failed_load():
    from llmctl.server.engine import Engine, QueueFull

    e = Engine("/nonexistent/model", 1, 2, 0, _Metrics(), device="cpu")
    e.submit([object(), object()])
    with pytest.raises(QueueFull):
        e.submit([object()])
    e.start()
    e.thread.join(60)
    assert e.error is not None and not e.ready.is_set()


def test_engine_thread_survives_a_failing_step(tmp_path, monkeypatch):
    path = _sharp_model(tmp_path / "m", "llama")
    e = _engine(path)
    try:
        boom = threading.Event()
        real = e._prefill

        def flaky(jobs):
            if not boom.is_set():
                boom.set()
                raise RuntimeError("simulated device error")
            return real(jobs)

        monkeypatch.setattr(e, "_prefill", flaky)
        j = _job(e, "the quick", 3)
        e.submit([j])
        item = j.out.get(timeout=30)
        assert item[0] == "error" and "simulated" in item[1]
        assert _alone(e, ["fox"], [3])[0][1] == "length"
    finally:
        e.stop()


def test_incremental_detokenization_equals_a_full_decode_and_decodes_a_short_window(tmp_path):
    """Multi-byte characters split across byte-level tokens: the streamed text equals one full
    decode of the output, and no step decodes more than a few tokens (not the whole output)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    texts = ["café naïve déjà vu 日本語のテキスト über straße " + s for s in sentences(120, seed=5)]
    tok = train_tiny_tokenizer(texts, tmp_path, vocab_size=300)
    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=256,
                      initializer_range=0.35, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    GenerationConfig(eos_token_id=None, pad_token_id=tok.pad_token_id).save_pretrained(tmp_path)
    e = _engine(tmp_path)
    try:
        widths = []
        real = e.tok.decode

        def counting(ids, **kw):
            widths.append(len(ids))
            return real(ids, **kw)

        e.tok.decode = counting
        jobs = [_job(e, p, 120, temperature=1.0, seed=s) for s, p in enumerate(["café", "日本", "the quick"])]
        e.submit(jobs)
        outs = [_collect(j) for j in jobs]
        e.tok.decode = real
        for j, (text, _, _) in zip(jobs, outs):
            assert text == real(j.tokens, skip_special_tokens=True)
        assert any(any(ord(c) > 127 for c in text) for text, _, _ in outs)
        assert max(len(j.tokens) for j in jobs) >= 100 and max(widths) <= 12  # a short window, not the whole output
    finally:
        e.stop()


def test_text_offsets_found_at_the_end_equal_the_streamed_ones(tmp_path):
    """A whole answer with logprobs is decoded once, at its end; its tokens' text offsets (from
    their UTF-8 bytes, or a replay of the incremental decode when those do not spell the text)
    equal the offsets a stream finds token by token: multi-byte characters split across tokens,
    and a special token (no text) in the middle."""
    from llmctl.server.engine import Engine, Job

    texts = ["café naïve déjà vu 日本語のテキスト über straße " + s for s in sentences(120, seed=5)]
    tok = train_tiny_tokenizer(texts, tmp_path, vocab_size=300)
    e = Engine(str(tmp_path), 1, 1, 0, _Metrics())
    e.tok = tok
    plain = tok("déjà vu 日本語 über", add_special_tokens=False)["input_ids"]
    assert any(len(e.token_bytes(t)) == 1 and e.token_bytes(t)[0] >= 0x80 for t in plain)  # a character split across tokens
    for ids in (plain, plain[:3] + [tok.pad_token_id] + plain[3:]):
        streamed = Job([], 0)
        ends = []
        for i, t in enumerate(ids):
            streamed.tokens.append(t)
            e._detokenize(streamed, final=i == len(ids) - 1)
            ends.append(len(streamed.text))
        whole = Job([], 0, tokens=list(ids))
        e._detokenize(whole, final=True)
        e._text_ends(whole)
        assert whole.text == streamed.text and whole.ends == ends
