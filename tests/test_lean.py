"""The lean decoding path against transformers itself: same logits, same tokens, same draws."""

from __future__ import annotations

import pytest
import torch

from conftest import sentences, train_tiny_tokenizer

V = 300


def _model(arch: str, **kw):
    import transformers

    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    common.update(kw)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    if arch == "qwen3":
        common["head_dim"] = 16  # wider than hidden / heads, as Qwen3 models are
    torch.manual_seed(0)
    model = cls[1](cls[0](**common)).eval()
    with torch.no_grad():  # sharper than a fresh init, so argmax ties cannot hide a difference
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.mark.parametrize("arch,kw", [
    ("llama", {}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    ("qwen2", {}),  # q/k/v biases
    ("llama", {"attention_bias": True, "mlp_bias": True}),  # o_proj and down_proj biases too
    ("qwen3", {}),  # q/k norms, head_dim != hidden / heads
    ("mistral", {"sliding_window": None}),
])
@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_logits_equal_transformers(arch, kw, runtime):
    from llmctl.inference.lean import LeanDecoder, unsupported

    model = _model(arch, **kw)
    assert unsupported(model) is None
    dec = LeanDecoder(model, runtime=runtime)
    # folded weights (norms, scale, rotary in the matmuls) unless q/k norms sit in between
    assert (dec.fast is None) == (arch == "qwen3")
    # compiled to onnxruntime (installed with the dev extras): the folded pass, or the unfolded one (qwen3)
    assert (dec.ort is not None) == (runtime == "onnxruntime"), dec.ort_skipped
    assert runtime == "torch" or type(dec.ort).__name__ == ("OrtUnfolded" if arch == "qwen3" else "OrtStep")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as batched generation has
    mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 2)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    last = dec.forward(ids[:, :8], pos[:, :8], dec.new_cache(), mask=mask[:, :8])  # a prompt as served (compiled with onnxruntime)
    assert torch.allclose(last, ref[:, 7], atol=1e-4), (last - ref[:, 7]).abs().max()
    cache = dec.new_cache()
    got = dec.forward(ids[:, :8], pos[:, :8], cache, mask=mask[:, :8], all_logits=True)
    real = mask[:, :8].bool()
    assert torch.allclose(got[real], ref[:, :8][real], atol=1e-4), (got[real] - ref[:, :8][real]).abs().max()
    # then token by token on the cache: the decode step users wait on
    for t in range(8, 11):
        step = dec.forward(ids[:, t : t + 1], pos[:, t : t + 1], cache, mask=mask[:, : t + 1])
        assert torch.allclose(step, ref[:, t], atol=1e-4), (step - ref[:, t]).abs().max()


def test_onnxruntime_step_that_disagrees_is_not_used(monkeypatch):
    """OrtStep checks its graph against the eager folded pass when it is built; a session that
    computes anything else is dropped (the eager pass decodes) and the reason kept."""
    import llmctl.inference.lean_ort
    from llmctl.inference.lean import LeanDecoder

    model = _model("llama")
    monkeypatch.setattr(llmctl.inference.lean_ort, "TOLERANCE", -1.0)  # nothing can pass
    dec = LeanDecoder(model)
    assert dec.ort is None and "differ from the eager pass" in dec.ort_skipped
    monkeypatch.setattr(llmctl.inference.lean_ort, "TOLERANCE", 1e-4)
    monkeypatch.setenv("LLMCTL_LEAN_ORT", "0")
    assert LeanDecoder(model).ort is None


def test_onnxruntime_step_follows_cache_merges():
    """Continuous batching on the onnxruntime step: rows selected out, caches of different
    lengths stacked and leading columns dropped give the logits of each row decoded alone."""
    from llmctl.inference.lean import LeanDecoder

    model = _model("llama")
    dec = LeanDecoder(model)
    assert dec.ort is not None, dec.ort_skipped
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(3, V, (2, 9), generator=g), torch.randint(3, V, (1, 4), generator=g)

    def alone(ids, steps):  # the eager pass (itself checked against transformers above)
        cache = dec.new_cache()
        pos = torch.arange(ids.shape[1])[None]
        out = dec.forward(ids, pos, cache, runtime="torch")
        for t in range(steps):
            out = dec.forward(out.argmax(-1)[:, None], pos[:, -1:] + 1 + t, cache, runtime="torch")
        return out

    ca, cb = dec.new_cache(), dec.new_cache()
    la = dec.forward(a, torch.arange(9).repeat(2, 1), ca)
    lb = dec.forward(b, torch.arange(4)[None], cb)
    ca.select(torch.tensor([1]))  # row 0 leaves
    ca.stack(cb)  # b joins, left-padded by 5 columns
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :5] = 0
    pos = torch.tensor([[9], [4]])
    nxt = torch.stack([la[1].argmax(), lb[0].argmax()])[:, None]
    for t in range(2):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        out = dec.forward(nxt, pos + t, ca, mask=mask)
        nxt = out.argmax(-1)[:, None]
    assert torch.allclose(out[0], alone(a[1:], 2), atol=1e-4)
    ca.select(torch.tensor([1]))  # a leaves: b's 5 padding columns are used by no row
    ca.drop_leading(5)
    mask = torch.cat([mask[1:, 5:], torch.ones(1, 1, dtype=torch.long)], dim=1)
    out = dec.forward(nxt[1:], pos[1:] + 2, ca, mask=mask)
    assert torch.allclose(out[0], alone(b, 3)[0], atol=1e-4)


def test_unsupported_models_fall_back():
    import transformers

    from llmctl.inference.lean import decoder_for, unsupported

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert "gpt2" in unsupported(gpt2) and decoder_for(gpt2) is None
    dyn = _model("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    assert "dynamic" in unsupported(dyn)
    from llmctl.inference.lean import sliding_window

    assert sliding_window(_model("mistral", sliding_window=16)) == 16


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tiny_tokenizer(sentences(200), tmp_path_factory.mktemp("tok"), vocab_size=V)


@pytest.mark.parametrize("sampling", [
    dict(do_sample=False),
    dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, num_return_sequences=2, seed=7),
    dict(do_sample=False, logprobs=3),
])
def test_generate_batch_matches_transformers_generate(tok, monkeypatch, sampling):
    """generate_batch through the lean path returns what `model.generate` returns: the same
    texts, finish reasons, token counts and logprobs, with prompts of different lengths (left
    padding), a stop string, EOS, and seeded sampling with every processor."""
    import llmctl.inference.lean
    from llmctl.generation import Sampling, generate_batch

    model = _model("llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    prompts = ["the cat", "a much longer prompt about the dog and", "hello"]
    sp = Sampling(**{"max_new_tokens": 16, **sampling})
    monkeypatch.setenv("LLMCTL_LEAN", "0")
    free = generate_batch(model, tok, prompts, sp)
    # Make the rows end differently: row 0 on a stop string, row 1 on EOS, the rest by length.
    ids1 = tok(free[1 * sp.num_return_sequences]["text"], add_special_tokens=False)["input_ids"]
    model.generation_config.eos_token_id = ids1[4]
    stop = free[0]["text"][6:8]
    sp.stop = (stop,)
    ref = generate_batch(model, tok, prompts, sp)
    monkeypatch.setenv("LLMCTL_LEAN", "1")
    calls = []
    real = llmctl.inference.lean.LeanDecoder.forward
    monkeypatch.setattr(llmctl.inference.lean.LeanDecoder, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    lean = generate_batch(model, tok, prompts, sp)
    assert calls, "the lean path was not taken"
    assert len(lean) == len(ref) == len(prompts) * sp.num_return_sequences
    for a, b in zip(lean, ref):
        assert (a["text"], a["finish_reason"], a["completion_tokens"]) == (b["text"], b["finish_reason"], b["completion_tokens"])
        if sp.logprobs is not None:
            assert [e["id"] for e in a["logprobs"]] == [e["id"] for e in b["logprobs"]]
            assert [e["logprob"] for e in a["logprobs"]] == pytest.approx([e["logprob"] for e in b["logprobs"]], abs=1e-4)
    if not sp.do_sample:
        assert [r["finish_reason"] for r in ref] == ["stop", "eos", "length"], [r["text"] for r in ref]


def test_streamer_sees_the_same_text(tok, capsys):
    from transformers import TextStreamer

    from llmctl.generation import Sampling, generate_batch

    model = _model("llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    res = generate_batch(model, tok, ["the cat"], Sampling(max_new_tokens=12), streamer=TextStreamer(tok, skip_prompt=True))
    assert capsys.readouterr().out.strip() == res[0]["text"].strip()


def test_hub_generation_config_extras_use_generate(tok):
    """A generation_config.json that asks for a processor the lean loop does not apply
    (no_repeat_ngram_size here) is decoded by transformers, so its output stays right."""
    from llmctl.generation import _lean_for

    model = _model("llama", vocab_size=len(tok))
    assert _lean_for(model, 20) is not None
    model.generation_config.no_repeat_ngram_size = 3
    assert _lean_for(model, 20) is None


def test_model_is_not_altered_and_big_models_call_their_linears(monkeypatch):
    """The fused weights are copies (the model still saves: no shared storage); past
    FUSE_MAX_PARAMS the Linears are called one by one, with the same logits."""
    from llmctl.inference.lean import LeanDecoder

    model = _model("llama")
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    ids = torch.randint(3, V, (1, 9), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(9)[None]
    fused = LeanDecoder(model)
    assert fused.fast is not None and fused.plan is None  # folded: the unfolded fused copies are freed
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    monkeypatch.setattr(LeanDecoder, "FUSE_MAX_PARAMS", 0)
    split = LeanDecoder(model)
    assert split.plan[0]["qkv"] is None and split.plan[0]["gu"] is None and split.fast is None
    assert split.plan[0]["q"][0] is model.model.layers[0].self_attn.q_proj.weight  # the model's own, not a copy
    assert fused.fast is not None
    with torch.no_grad():
        ref = model(ids).logits[:, -1].float()
    for dec in (fused, split):
        assert torch.allclose(dec.forward(ids, pos, dec.new_cache()), ref, atol=1e-4)
    # The unfolded pass runs every plain float32 Linear through oneDNN's kernel on the CPU (twice
    # MKL's rate at decode's few rows on the 85M bench model), never the module's forward.
    from llmctl.inference import lean

    if lean.ONEDNN_LINEAR is not None:
        assert split.linear is lean.ONEDNN_LINEAR
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda *a: (_ for _ in ()).throw(AssertionError("a module call")))
    assert torch.allclose(split.forward(ids, pos, split.new_cache()), ref, atol=1e-4)
    monkeypatch.setenv("LLMCTL_ONEDNN", "0")
    assert lean._onednn_linear() is None


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_weights_changed_after_a_decode_are_decoded_with(monkeypatch, runtime):
    """The decoder kept on the model holds folded copies of the weights (and onnxruntime graphs
    with them as constants): a weight changed in place after a decode is picked up by the next
    one, which equals `model.forward` again."""
    from llmctl.inference.lean import decoder_for

    if runtime == "torch":
        monkeypatch.setenv("LLMCTL_LEAN_ORT", "0")
    model = _model("llama")
    ids = torch.randint(3, V, (1, 9), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(9)[None]

    def check():
        dec = decoder_for(model)
        assert dec is not None and (dec.ort is not None) == (runtime == "onnxruntime"), dec.ort_skipped
        cache = dec.new_cache()
        got = dec.forward(ids[:, :8], pos[:, :8], cache)
        step = dec.forward(ids[:, 8:], pos[:, 8:], cache)  # a decode step (the compiled one with onnxruntime)
        with torch.no_grad():
            ref = model(ids).logits.float()
        assert torch.allclose(got, ref[:, 7], atol=1e-4), (got - ref[:, 7]).abs().max()
        assert torch.allclose(step, ref[:, 8], atol=1e-4), (step - ref[:, 8]).abs().max()
        return dec

    first = check()
    assert decoder_for(model) is first  # kept while the weights stay
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    check()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.mul_(-3.0)
    check()
    model.load_state_dict({k: v * 1.5 for k, v in model.state_dict().items() if k.endswith("down_proj.weight")}, strict=False)
    check()


def test_a_skipped_fast_path_says_why_once(tok, monkeypatch, capsys):
    """Where the lean path or its onnxruntime step is not used, one line on stderr says why:
    once per model, however many decodes follow."""
    import transformers

    import llmctl.inference.lean_ort
    from llmctl.generation import Sampling, generate_batch
    from llmctl.inference.lean import decoder_for

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                                                pad_token_id=tok.pad_token_id))
    for _ in range(2):
        assert decoder_for(gpt2) is None
        generate_batch(gpt2, tok, ["the cat"], Sampling(max_new_tokens=2))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "lean decoding is off" in lines[0] and "gpt2" in lines[0], lines
    monkeypatch.setattr(llmctl.inference.lean_ort, "TOLERANCE", -1.0)  # the compiled step never passes its check
    model = _model("llama", vocab_size=len(tok))
    for _ in range(2):
        assert decoder_for(model).ort is None
        generate_batch(model, tok, ["the cat"], Sampling(max_new_tokens=2))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "onnxruntime" in lines[0] and "differ from the eager pass" in lines[0], lines


def test_a_decoder_that_disagrees_with_the_models_forward_is_dropped(tok, monkeypatch, capsys):
    """The fast path is checked at load against `model.forward` (not against itself): a decoder
    whose logits differ is not used, and one line says why."""
    import llmctl.inference.lean as lean
    from llmctl.generation import Sampling, generate_batch

    model = _model("llama", vocab_size=len(tok))
    assert lean.decoder_for(model) is not None and model._llmctl_lean.disagrees is None
    real = lean.LeanDecoder.forward
    monkeypatch.setattr(lean.LeanDecoder, "forward", lambda self, *a, **k: real(self, *a, **k) + 1e-2)
    model2 = _model("llama", vocab_size=len(tok))
    for _ in range(2):
        assert lean.decoder_for(model2) is None
        out = generate_batch(model2, tok, ["the cat"], Sampling(max_new_tokens=2, do_sample=False))
        assert out[0]["completion_tokens"] == 2  # transformers decodes instead
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "lean decoding is off" in lines[0] and "model's own forward" in lines[0], lines


def test_a_dynamically_quantized_model_keeps_the_lean_path():
    """int8 dynamic quantization takes its activations' scale per call, over every row the call
    holds: the probe compares with the model's forward as generate calls it (prompt, then a step on
    the cache, the output layer on the last position), and a quantized model is not refused for a
    difference in how the batch is split (it was: 0.12 on the 85M bench model, so int8 decoded
    with transformers). Greedy tokens equal transformers' generate."""
    from llmctl import quantize
    from llmctl.inference.lean import decoder_for

    model = _model("llama")
    model.llmctl_quantization = quantize.quantize_model(model, "int8")
    dec = decoder_for(model)
    assert dec is not None and dec.fast is None and "int8" in dec.fast_skipped
    assert type(dec.ort).__name__ == "OrtUnfolded", dec.ort_skipped  # its steps: onnxruntime's int8 graph
    # q/k/v and gate/up as one int8 call each, o, down and the output layer on their own packed weights
    assert all(type(p[n][0]).__name__ == "Int8Linears" for p in dec.plan for n in ("qkv", "gu", "o", "down"))
    assert type(dec.head_w[0]).__name__ == "Int8Linears"
    ids = torch.randint(3, V, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 7:].tolist()
    cache, pos, out = dec.new_cache(), torch.arange(7)[None], []
    logits = dec.forward(ids, pos, cache)
    for i in range(8):
        out.append(int(logits.argmax(-1)))
        logits = dec.forward(torch.tensor([[out[-1]]]), torch.tensor([[7 + i]]), cache)
    assert out == ref


def test_the_prompt_graphs_threads_sleep_between_runs(monkeypatch, capfd):
    """The step graph's threads spin between runs (steps come back to back); the prompt graph's
    do not: spinning on after a prompt, they took the cores the next steps needed
    (bench/serve_32m.py). LLMCTL_ORT_PREFILL_SPIN=1 lets them spin, with the same logits."""
    from llmctl.inference.lean import LeanDecoder
    from llmctl.inference.lean_ort import SPINNING

    model = _model("llama")

    def spinning(dec):  # onnxruntime's default (the entry unset: get raises) is to spin
        out = []
        for sess in (dec.ort.sess, dec.ort.prefill_sess):
            try:
                out.append(sess.get_session_options().get_session_config_entry(SPINNING) != "0")
            except RuntimeError:
                out.append(True)
        return out

    capfd.readouterr()
    dec = LeanDecoder(model)
    assert dec.ort is not None and spinning(dec) == [True, False], dec.ort_skipped
    assert "onnxruntime" not in capfd.readouterr().err  # nothing on stderr (a config entry set twice is warned about)
    monkeypatch.setenv("LLMCTL_ORT_PREFILL_SPIN", "1")
    dec2 = LeanDecoder(model)
    assert dec2.ort is not None and spinning(dec2) == [True, True]
    ids, pos = torch.randint(3, V, (2, 6), generator=torch.Generator().manual_seed(2)), torch.arange(6).expand(2, 6)
    assert torch.allclose(dec.forward(ids, pos, dec.new_cache()), dec2.forward(ids, pos, dec2.new_cache()), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int8_projections_with_one_input_run_as_one_call_with_the_same_outputs(arch):
    """Per-channel int8 q/k/v (with biases, for qwen2) and gate/up stacked into one fbgemm call give
    the separate modules' outputs bit for bit, at a decode step's rows and a prompt's; int8 Linears
    quantized per tensor (one scale for the stacked rows would change them) are called one by one."""
    from torch.ao.quantization import quantize_dynamic

    from llmctl import quantize
    from llmctl.inference.lean import Int8Linears

    model = _model(arch)
    quantize.quantize_model(model, "int8")
    a, m = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert (a.q_proj.bias() is not None) == (arch == "qwen2")
    for mods in ((a.q_proj, a.k_proj, a.v_proj), (m.gate_proj, m.up_proj)):
        assert Int8Linears.covers(mods)
        fused = Int8Linears(mods)
        for rows in (1, 4, 9):
            x = torch.randn(rows, mods[0].in_features)
            assert torch.equal(fused(x), torch.cat([mod(x) for mod in mods], dim=-1))
    per_tensor = _model(arch)
    quantize_dynamic(per_tensor, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    a = per_tensor.model.layers[0].self_attn
    assert not Int8Linears.covers((a.q_proj, a.k_proj, a.v_proj))
    from llmctl.inference.lean import LeanDecoder

    assert LeanDecoder(per_tensor).plan[0]["qkv"] is None


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_an_int8_model_decodes_bit_for_bit_as_its_own_forward(arch):
    """Dynamic int8 quantizes each Linear's input per call: a rounding apart anywhere before it
    (another RMSNorm formula, a fused multiply-add in rotary) can move an int8 value and the logits
    by a quantization step (0.1 on the 85M bench model's probe), so the unfolded pass must compute
    what transformers computes to the bit, for a prompt and the steps after it, at one and two rows."""
    from llmctl import quantize
    from llmctl.inference.lean import LeanDecoder

    model = _model(arch)
    model.llmctl_quantization = quantize.quantize_model(model, "int8")
    dec = LeanDecoder(model, runtime="torch")  # the eager pass: prompts (and steps where onnxruntime is off)
    for rows in (1, 2):
        ids = torch.randint(3, V, (rows, 7), generator=torch.Generator().manual_seed(3))
        steps = torch.randint(3, V, (3, rows, 1), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            out = model(ids, use_cache=True, logits_to_keep=1)
            key = "cache" if "cache" in out else "past_key_values"  # transformers 5 renames the cache
            ref = [out.logits[:, -1]]
            for i, t in enumerate(steps):
                out = model(t, use_cache=True, position_ids=torch.full((rows, 1), 7 + i), **{key: out[key]})
                ref.append(out.logits[:, -1])
            cache = dec.new_cache()
            got = [dec.forward(ids, torch.arange(7)[None].expand(rows, 7), cache)]
            got += [dec.forward(t, torch.full((rows, 1), 7 + i), cache) for i, t in enumerate(steps)]
        assert all(torch.equal(g, r) for g, r in zip(got, ref)), [float((g - r).abs().max()) for g, r in zip(got, ref)]


def _int8_model(arch: str, **kw):
    from llmctl import quantize

    model = _model(arch, **kw)
    model.llmctl_quantization = quantize.quantize_model(model, "int8")
    return model


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("qwen2", {}), ("qwen3", {}), ("llama", {"attention_bias": True, "mlp_bias": True})])
def test_an_int8_models_steps_run_in_int8_on_onnxruntime(arch, kw):
    """An int8 model's decode step is one onnxruntime graph whose projections are int8 matmuls by
    the model's own int8 weights (no float copy of them: the only float MatMuls are attention's);
    its probe against the float matmul by the same weights is no worse than torch's int8 pass's,
    and greedy decoding gives transformers' tokens (prompt on the eager pass, steps on the graph)."""
    from llmctl.inference.lean import decoder_for

    model = _int8_model(arch, **kw)
    dec = decoder_for(model)
    assert dec is not None and dec.disagrees is None
    assert type(dec.ort).__name__ == "OrtUnfolded", dec.ort_skipped
    L = len(dec.layers)
    for graph, attention in (("step", 3), ("prefill", 2)):
        ops = dec.ort.ops[graph]
        assert ops["MatMulInteger"] == 4 * L + 1  # q/k/v, o, gate/up, down per layer, and the output layer
        # step: scores against the cache and the new key, weights by the cached values; prefill: scores, weights
        assert ops["MatMul"] == attention * L, ops
    errs = dec.ort.probe_errors
    assert 0 < errs["onnxruntime"] <= 2 * errs["torch"], errs
    ids = torch.randint(3, V, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 7:].tolist()
    cache, out = dec.new_cache(), []
    logits = dec.forward(ids, torch.arange(7)[None], cache)
    for i in range(10):
        out.append(int(logits.argmax(-1)))
        logits = dec.forward(torch.tensor([[out[-1]]]), torch.tensor([[7 + i]]), cache)
    assert out == ref


def test_int8_on_onnxruntime_gives_a_row_the_same_answer_alone_and_in_a_batch():
    """onnxruntime's int8 graphs quantize each row's activations on its own: a row's logits at a
    step, or for its prompt, do not depend on the rows beside it or on padding (torch's int8 takes
    one scale per call, over every row, and its answer moves with the batch)."""
    from llmctl.inference.kvcache import KVCache
    from llmctl.inference.lean import decoder_for

    model = _int8_model("llama")
    dec = decoder_for(model)
    assert type(dec.ort).__name__ == "OrtUnfolded", dec.ort_skipped
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, V, (1, 6), generator=g), torch.randint(3, V, (1, 6), generator=g)]
    step = torch.tensor([[11], [250]])

    def caches():
        cs = []
        for p in prompts:
            c = dec.new_cache()
            dec.forward(p, torch.arange(6)[None], c, runtime="torch")
            cs.append(c)
        return cs

    diffs = {}
    for runtime in (None, "torch"):
        a, b = caches()
        alone = dec.forward(step[:1], torch.tensor([[6]]), a, runtime=runtime)
        a, b = caches()
        a.stack(b)
        both = dec.forward(step, torch.tensor([[6], [6]]), a, runtime=runtime)
        assert isinstance(a, KVCache) and a.buf.shape[2] == 2
        diffs[runtime] = float((both[0] - alone[0]).abs().max())
    assert diffs[None] < 1e-4 < diffs["torch"], diffs
    # prompts too: a short prompt left-padded in a batch with a longer one, against it alone
    ids = torch.randint(3, V, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    for runtime in (None, "torch"):
        both = dec.forward(ids, pos, dec.new_cache(), mask=mask, runtime=runtime)
        alone = dec.forward(ids[1:, 2:], pos[1:, 2:], dec.new_cache(), runtime=runtime)
        diffs[runtime] = float((both[1] - alone[0]).abs().max())
    assert diffs[None] < 1e-4 < diffs["torch"], diffs


def test_an_int8_step_graph_that_computes_wrong_numbers_is_dropped(monkeypatch, capsys):
    """OrtUnfolded checks its graph at build: past its bound it is not used, one line says why, and
    the eager int8 pass decodes (still checked against the model's forward)."""
    import llmctl.inference.lean_ort
    from llmctl.inference.lean import decoder_for

    monkeypatch.setattr(llmctl.inference.lean_ort, "INT8_BOUND", -1.0)  # nothing can pass
    model = _int8_model("llama")
    dec = decoder_for(model)
    assert dec is not None and dec.ort is None and dec.disagrees is None
    assert "onnxruntime's int8 step is" in dec.ort_skipped
    err = capsys.readouterr().err
    assert "the onnxruntime decode step is off" in err and "eager lean pass" in err


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_float_model_past_the_fold_limit_runs_unfolded_graphs_on_its_own_weights(arch, monkeypatch):
    """Past FUSE_MAX_PARAMS nothing is folded or stacked: the unfolded graphs run Gemm on the
    model's own [out, in] weights (q, k, v and gate, up one by one; no transposed copy in the graph), to float
    rounding of transformers' forward at a padded prompt and the steps after it. Past
    UNFOLDED_F32_MAX_PARAMS they are not built, and the line on stderr says why."""
    from llmctl.inference.lean import LeanDecoder

    monkeypatch.setattr(LeanDecoder, "FUSE_MAX_PARAMS", 0)
    model = _model(arch)
    dec = LeanDecoder(model)
    assert dec.fast is None and dec.plan[0]["qkv"] is None
    assert type(dec.ort).__name__ == "OrtUnfolded" and dec.ort.exact, dec.ort_skipped
    L = len(dec.layers)
    for graph in ("step", "prefill"):
        ops = dec.ort.ops[graph]
        assert ops["Gemm"] == 7 * L + 1 and not ops["MatMulInteger"], ops
        assert dec.ort.ops[graph + " on the model's tensors"] == {"Gemm": 7 * L + 1, "Gather": 1}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    cache = dec.new_cache()
    got = [dec.forward(ids[:, :6], pos[:, :6], cache, mask=mask[:, :6])]
    got += [dec.forward(ids[:, t : t + 1], pos[:, t : t + 1], cache, mask=mask[:, : t + 1]) for t in range(6, 9)]
    for t, logits in zip(range(5, 9), got):
        assert torch.allclose(logits, ref[:, t], atol=1e-4), (t, (logits - ref[:, t]).abs().max())
    monkeypatch.setattr(LeanDecoder, "UNFOLDED_F32_MAX_PARAMS", 0)
    dec = LeanDecoder(model)
    assert dec.ort is None and "packed copy of the weights" in dec.ort_skipped
    import llmctl.inference.lean_ort

    monkeypatch.setattr(LeanDecoder, "UNFOLDED_F32_MAX_PARAMS", 10**12)
    monkeypatch.setattr(llmctl.inference.lean_ort, "TOLERANCE", -1.0)  # a graph that disagrees with the eager pass is dropped
    dec = LeanDecoder(model)
    assert dec.ort is None and "differ from the eager pass" in dec.ort_skipped


@pytest.mark.parametrize("quant", [None, "int8"])
def test_the_unfolded_graphs_share_the_weights_with_onnxruntime_not_copies(quant, monkeypatch):
    """The weights the unfolded graphs read (the model's own float tensors; an int8 model's int8
    weights) are handed to onnxruntime to use in place, not copied into each session: the graphs'
    bytes hold none of them, and the prompt graph, whose weights are not packed, reads the
    model's own memory: a weight changed in place after the build changes its logits (with
    onnxruntime's add_external_initializers, a copy per session, it did not)."""
    from llmctl.inference.lean import LeanDecoder

    monkeypatch.setattr(LeanDecoder, "FUSE_MAX_PARAMS", 0)
    model = _model("llama", hidden_size=64, intermediate_size=512)
    # the projections' and output layer's bytes: int8, one a weight; float32, four
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) * (1 if quant else 4)
    if quant:
        from llmctl.quantize import quantize_model

        quantize_model(model, quant)
    dec = LeanDecoder(model)
    assert type(dec.ort).__name__ == "OrtUnfolded", dec.ort_skipped
    for graph, size in dec.ort.graph_bytes.items():
        assert size < weights / 2, (graph, size, weights)
    ids = torch.randint(3, V, (1, 5), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(5)[None]
    before = dec.forward(ids, pos, dec.new_cache())
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3)
    after = dec.forward(ids, pos, dec.new_cache())
    assert (after - before).abs().max() > 1e-3
