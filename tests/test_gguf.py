"""GGUF: the embedded tokenizer as llama.cpp reads it, every hyperparameter, quantized types, llama.cpp itself."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from conftest import invoke_cli, sentences
from llmctl.config import load_config
from llmctl.errors import ConfigError
from llmctl.exporters import common, gguf as gx, gguf_tokenizer as gt
from llmctl.stages import export


def _tiny_llama(tok, seed: int = 0, **kw):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    m = LlamaForCausalLM(LlamaConfig(**{**base, **kw})).eval()
    with torch.no_grad():  # larger than init so rounding and rope differences show in the logits
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _replace_model(rd, model) -> None:
    """Put `model` where export reads the trained model (the run's tokenizer stays)."""
    model.save_pretrained(rd.model_dir)


def _train_tok(pre, model_kwargs=None, **extra):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(**(model_kwargs or {})))
    t.pre_tokenizer = pre
    t.decoder = extra.pop("decoder", decoders.ByteLevel())
    alphabet = [] if (model_kwargs or {}).get("byte_fallback") else pre_tokenizers.ByteLevel.alphabet()
    tr = trainers.BpeTrainer(vocab_size=extra.pop("vocab_size", 400), special_tokens=["<|endoftext|>", "<|bos|>", "<|pad|>"],
                             initial_alphabet=alphabet, show_progress=False)
    t.train_from_iterator(sentences(64, seed=1) + list(gt.PROBES), tr)
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", bos_token="<|bos|>", pad_token="<|pad|>", **extra)


def _gpt2_style_tok():
    from tokenizers import pre_tokenizers

    return _train_tok(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))


def _llama3_style_tok():
    from tokenizers import Regex, pre_tokenizers

    split = gt.PRE_TOKENIZERS["llama-bpe"][0][0]
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return _train_tok(pre, {"ignore_merges": True})


def _field(path, key):
    import gguf

    f = gguf.GGUFReader(str(path)).fields.get(key)
    return None if f is None else f.contents()


# ---------------------------------------------------------------- tokenizer


def test_trained_tokenizer_is_gpt2_and_embedded_tokenizer_matches(trained_run):
    from transformers import AutoTokenizer

    path, cfg, rd = trained_run
    export.run(load_config(path, ["export.formats=[gguf]", "export.gguf_types=[f16]"]), rd)
    f = rd.export_dir("gguf") / "model-f16.gguf"
    tok = AutoTokenizer.from_pretrained(rd.model_dir)
    assert _field(f, "tokenizer.ggml.pre") == "gpt-2"
    m = rd.manifest("export")
    assert m["formats_info"]["gguf"]["tokenizer_pre"] == "gpt-2"
    v = m["verification"]["gguf:f16"]["tokenizer"]
    assert v["passed"] and v["mismatched"] == 0 and v["probes"] == len(gt.PROBES) >= 10
    embedded, pre = gt.from_gguf(f)
    for text in gt.PROBES:
        assert embedded(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert not _field(f, "tokenizer.ggml.add_bos_token")  # the trained tokenizer adds no BOS


def test_old_default_pre_tokenizer_is_caught(tmp_path):
    """What older exports wrote ('default') reads ' (', ' =', digits and 's differently: the check says so."""

    tok = _gpt2_style_tok()  # merges across ' (' and digits: splitting differences change ids
    assert gt.identify(tok) == "gpt-2"
    model = _tiny_llama(tok)
    f = gx.write(model, tok, tmp_path, "f32", "t", pre="default")
    r = gt.check_file(f, tok)
    assert r["pre"] == "default" and r["mismatched"] >= 3
    ids, mask = common.verify_batch(tok)
    diff, tol, info = gx.verify(f, common.reference_logits(model, ids, mask), ids, mask, "f32", tok, model)
    assert diff <= tol and not info["tokenizer"]["passed"]  # right weights, wrong text: still a failure


def test_llama3_style_tokenizer_is_llama_bpe(tmp_path):
    tok = _llama3_style_tok()
    assert gt.identify(tok) == "llama-bpe"
    model = _tiny_llama(tok)
    f = gx.write(model, tok, tmp_path, "f32", "t")
    assert _field(f, "tokenizer.ggml.pre") == "llama-bpe"
    assert gt.check_file(f, tok)["mismatched"] == 0


def test_sentencepiece_and_prefix_space_tokenizers_refused(tmp_path):
    from tokenizers import decoders, pre_tokenizers

    spm = _train_tok(pre_tokenizers.Metaspace(), {"byte_fallback": True, "unk_token": "<|pad|>"}, decoder=decoders.Metaspace())
    with pytest.raises(ConfigError, match="SentencePiece-style"):
        gt.identify(spm)
    prefixed = _train_tok(pre_tokenizers.ByteLevel(add_prefix_space=True))
    with pytest.raises(ConfigError, match="splits text unlike every llama.cpp pre-tokenizer"):
        gt.identify(prefixed)


def test_cli_refuses_sentencepiece_tokenizer_before_any_work(trained_run):
    from tokenizers import decoders, pre_tokenizers

    path, cfg, rd = trained_run
    spm = _train_tok(pre_tokenizers.Metaspace(), {"byte_fallback": True, "unk_token": "<|pad|>"}, decoder=decoders.Metaspace(), vocab_size=200)
    spm.save_pretrained(rd.model_dir)
    r = invoke_cli("export", str(path), "-f", "hf", "-f", "gguf")
    assert r.returncode == 2, r.stderr
    assert "SentencePiece-style" in r.stderr and "Traceback" not in r.stderr
    assert rd.manifest("export") is None and not rd.export_dir("hf").exists()


# ---------------------------------------------------------------- shapes and hyperparameters


def test_rows_not_multiple_of_32_kept_f16_with_gqa(tmp_path):
    """intermediate_size 176 crashed q8_0 with a QuantError; GQA (4 heads, 2 kv heads) permutes k by kv heads."""
    from conftest import build_trained_run, tiny_config_dict, write_config

    p = write_config(tmp_path / "c.yaml", tiny_config_dict(
        tmp_path / "run", model={"n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "hidden_size": 64, "intermediate_size": 176},
        export={"formats": ["gguf"], "gguf_types": ["f32", "q8_0", "q4_0"]}))
    cfg = load_config(p)
    rd = build_trained_run(tmp_path / "run", cfg)
    r = invoke_cli("export", str(p), "--json")
    assert r.returncode == 0, r.stderr
    m = rd.manifest("export")
    kept = m["formats_info"]["gguf"]["kept_higher_precision"]
    assert kept["f32"] == {} and kept["q8_0"] == {"blk.0.ffn_down.weight": "f16"} == kept["q4_0"]
    types = gx.tensor_types(rd.export_dir("gguf") / "model-q4_0.gguf")
    assert types["blk.0.ffn_gate.weight"] == "q4_0" and types["blk.0.attn_norm.weight"] == "f32"
    for q in ("f32", "q8_0", "q4_0"):
        v = m["verification"][f"gguf:{q}"]
        assert v["passed"] and v["intended_weights"]["max_abs_diff"] <= v["intended_weights"]["tolerance"]
    assert m["verification"]["gguf:f32"]["max_abs_diff"] < 1e-4
    f = rd.export_dir("gguf") / "model-f32.gguf"
    assert _field(f, "llama.attention.head_count_kv") == 2 and _field(f, "llama.feed_forward_length") == 176


def test_transformers_gguf_loader_agrees_on_gqa(tmp_path):
    """A reader we did not write (transformers') gives the same logits: permutation and names are llama.cpp's."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = _llama3_style_tok()
    model = _tiny_llama(tok, num_attention_heads=4, num_key_value_heads=1)
    f = gx.write(model, tok, tmp_path, "f32", "t")
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f.name, dtype=torch.float32).eval()
    ids, mask = common.verify_batch(tok)
    assert common.max_diff(common.reference_logits(theirs, ids, mask), common.reference_logits(model, ids, mask), mask) < 1e-4


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16, "rope_theta": 500000.0},
])
def test_rope_scaling_biases_head_dim_untied(tmp_path, rope):
    import torch

    tok = _llama3_style_tok()
    kw = dict(rope_parameters=rope, attention_bias=True, mlp_bias=True, head_dim=32, tie_word_embeddings=False)
    model = _tiny_llama(tok, **kw)
    ids, mask = common.verify_batch(tok)
    ref = common.reference_logits(model, ids, mask)
    for q in ("f32", "q5_0"):
        f = gx.write(model, tok, tmp_path, q, "t")
        diff, tol, info = gx.verify(f, ref, ids, mask, q, tok, model)
        assert diff <= tol and all(v["passed"] for v in info.values()), (q, diff, info)
    f = tmp_path / "model-f32.gguf"
    assert _field(f, "llama.attention.key_length") == 32 and _field(f, "llama.rope.dimension_count") == 32
    if rope["rope_type"] == "linear":
        assert _field(f, "llama.rope.scaling.type") == "linear" and _field(f, "llama.rope.scaling.factor") == 4.0
    else:
        assert "rope_freqs.weight" in gx.tensor_types(f)
    assert "output.weight" in gx.tensor_types(f) and "blk.1.attn_q.bias" in gx.tensor_types(f) and "blk.0.ffn_down.bias" in gx.tensor_types(f)
    back, _ = gx.load(f)
    assert common.max_diff(common.reference_logits(back, ids, mask), ref, mask) < 1e-4
    # the scaling matters at these positions: the same weights with plain rope give other logits
    plain = _tiny_llama(tok, **{**kw, "rope_parameters": {"rope_type": "default", "rope_theta": rope["rope_theta"]}})
    plain.load_state_dict(model.state_dict())
    assert common.max_diff(common.reference_logits(plain, ids, mask), ref, mask) > 1e-3
    assert torch  # used


def test_unsupported_rope_and_activation_refused():
    tok = _llama3_style_tok()
    yarn = _tiny_llama(tok, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16})
    with pytest.raises(ConfigError, match="rope_type 'yarn'"):
        gx.check_supported(yarn, tok)
    gelu = _tiny_llama(tok, hidden_act="gelu")
    with pytest.raises(ConfigError, match="hidden_act is 'gelu'"):
        gx.check_supported(gelu, tok)
    small = _tiny_llama(tok, vocab_size=len(tok) - 8)
    with pytest.raises(ConfigError, match="vocab_size"):
        gx.check_supported(small, tok)


# ---------------------------------------------------------------- types, verify, shared model


def test_every_gguf_type_from_config(trained_run):
    path, cfg, rd = trained_run
    types = ["f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
    export.run(load_config(path, ["export.formats=[gguf]", f"export.gguf_types=[{','.join(types)}]"]), rd)
    m = rd.manifest("export")
    sizes = {q: (rd.export_dir("gguf") / f"model-{q}.gguf").stat().st_size for q in types}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q5_1"] > sizes["q5_0"] > sizes["q4_0"]
    assert sizes["q5_0"] > sizes["q4_1"] > sizes["q4_0"]
    for q in types:
        v = m["verification"][f"gguf:{q}"]
        assert v["passed"] and v["tolerance"] == pytest.approx(gx.TOLERANCE[q] * max(1.0, v["tolerance"] / gx.TOLERANCE[q]))
        assert gx.tensor_types(rd.export_dir("gguf") / f"model-{q}.gguf")["blk.0.ffn_up.weight"] == q
    r = invoke_cli("config", "validate", str(path), "--set", "export.gguf_types=[q3_k]")
    assert r.returncode == 2 and "gguf_types" in r.stderr


def test_wrong_tensor_caught_even_in_q4_0(trained_run, monkeypatch):
    """q4_0's loose logit tolerance cannot hide a misplaced tensor: the file must equal the intended rounding."""
    from llmctl.errors import LlmctlError

    from transformers import AutoTokenizer

    path, cfg, rd = trained_run
    _replace_model(rd, _tiny_llama(AutoTokenizer.from_pretrained(rd.model_dir), num_hidden_layers=1))
    monkeypatch.setattr(gx, "_permute", lambda w, n: w)  # q/k rows left in HF order: llama.cpp would rotate wrongly
    with pytest.raises(LlmctlError, match="gguf:q4_0 failed verification") as e:
        export.run(load_config(path, ["export.formats=[gguf]", "export.gguf_types=[q4_0]"]), rd)
    assert "intended_weights" in str(e.value) or "logits differ" in str(e.value)
    m = rd.manifest("export")
    assert m["status"] == "failed" and not rd.export_dir("gguf").exists()


def test_float16_hf_export_leaves_shared_model_unrounded(trained_run):
    """hf.write used to cast the shared model in place: later formats exported rounded weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmctl.exporters import hf

    path, cfg, rd = trained_run
    model = AutoModelForCausalLM.from_pretrained(rd.model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)  # values float16 cannot hold
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg16 = load_config(path, ["export.dtype=float16"])
    out = rd.stage_dir("export") / "h"
    out.mkdir(parents=True)
    hf.write(model, AutoTokenizer.from_pretrained(rd.model_dir), out, cfg16, "card")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.dtype == torch.float32 and json.loads((out / "config.json").read_text())["dtype"] == "float16"
    # end to end: a float16 hf export next to an f32 gguf, which must still hold the float32 weights
    _replace_model(rd, model)
    res = export.run(load_config(path, ["export.dtype=float16", "export.formats=[hf,gguf]", "export.gguf_types=[f32]"]), rd, force=True)
    assert res["max_abs_diff"]["gguf:f32"] < 1e-5


def test_export_verify_false_skips_and_says_so(trained_run, monkeypatch):
    from llmctl.exporters import hf

    path, cfg, rd = trained_run
    called = []
    monkeypatch.setattr(hf, "verify", lambda *a, **k: called.append(1) or (0.0, 1.0))
    monkeypatch.setattr(gx, "verify", lambda *a, **k: called.append(1) or (0.0, 1.0, {}))
    res = export.run(load_config(path, ["export.verify=false", "export.formats=[hf,gguf]", "export.gguf_types=[q8_0]"]), rd)
    m = rd.manifest("export")
    assert called == [] and m["verified"] is False and m["verification"] == {} and res["verified"] is False
    assert (rd.export_dir("gguf") / "model-q8_0.gguf").is_file() and m["files"]
    monkeypatch.undo()
    export.run(load_config(path, ["export.formats=[hf]"]), rd, force=True)
    assert rd.manifest("export")["verified"] is True and rd.manifest("export")["verification"]["hf"]["passed"]


# ---------------------------------------------------------------- llama.cpp itself


def test_llama_cpp_tokenizer_disagreement_fails_export(trained_run, tmp_path, monkeypatch):
    """When llama-tokenize is installed its ids must be the trained tokenizer's (here a stand-in that disagrees)."""
    from llmctl.errors import LlmctlError

    path, cfg, rd = trained_run
    fake = tmp_path / "bin" / "llama-tokenize"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\ncat > /dev/null\necho '[1, 2, 3]'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("LLAMA_CPP_BIN", str(fake.parent))
    with pytest.raises(LlmctlError, match="gguf:f32 failed verification: llama_cpp_tokenize: 0/10 probe texts"):
        export.run(load_config(path, ["export.formats=[gguf]", "export.gguf_types=[f32]"]), rd)
    assert not rd.export_dir("gguf").exists()


LLAMA_TOKENIZE = gx.llama_cpp("llama-tokenize")
LLAMA_PERPLEXITY = gx.llama_cpp("llama-perplexity")


@pytest.mark.slow
@pytest.mark.skipif(LLAMA_TOKENIZE is None or LLAMA_PERPLEXITY is None, reason="llama.cpp (llama-tokenize, llama-perplexity) not installed")
def test_llama_cpp_reads_gguf_as_trained(trained_run, tmp_path):
    """llama.cpp's own tokenizer equals the HF one on code and prose; its perplexity equals ours on the same weights."""
    import torch
    from transformers import AutoTokenizer

    path, cfg, rd = trained_run
    _gpt2_style_tok().save_pretrained(rd.model_dir)  # merges across punctuation and digits, unlike the tiny one
    tok = AutoTokenizer.from_pretrained(rd.model_dir)
    model = _tiny_llama(tok, num_hidden_layers=1, max_position_embeddings=64)
    _replace_model(rd, model)
    export.run(load_config(path, ["export.formats=[gguf]", "export.gguf_types=[f32,q8_0]"]), rd, force=True)
    f = rd.export_dir("gguf") / "model-f32.gguf"
    assert rd.manifest("export")["verification"]["gguf:f32"]["llama_cpp_tokenize"]["mismatched"] == 0
    for text in gt.PROBES:
        assert gx.llama_cpp_tokenize(f, text) == tok(text, add_special_tokens=False)["input_ids"], text
    ppl_cpp, ppl_ours = llama_cpp_perplexity(f, model, tok, "\n".join(sentences(40, seed=3)), ctx=32)
    assert abs(ppl_cpp / ppl_ours - 1) < 1e-3, (ppl_cpp, ppl_ours)
    assert torch  # used


def llama_cpp_perplexity(f, model, tok, text: str, ctx: int) -> tuple[float, float]:
    """llama-perplexity on `text` and the same number from `model`: llama.cpp scores the second
    half of each `ctx`-token chunk, the chunk's first token replaced by BOS when the vocab adds one."""
    import re
    import tempfile

    import torch

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write(text)
    r = subprocess.run([str(LLAMA_PERPLEXITY), "-m", str(f), "-f", fh.name, "-c", str(ctx), "-b", str(ctx), "-t", "1", "--no-warmup"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    est = float(re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr).group(1))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) // ctx * ctx, ctx):
            chunk = torch.tensor([ids[start : start + ctx]])
            logp = torch.log_softmax(model(chunk).logits.double(), -1)
            for j in range(ctx // 2, ctx - 1):
                nll -= float(logp[0, j, chunk[0, j + 1]])
                n += 1
    return est, math.exp(nll / n)
