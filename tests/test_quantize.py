"""Quantization: `--quantize int8|int4` in eval/generate/serve, eval on a GGUF file, the
hf-int8 export and the compression report (llmctl/quantize.py, llmctl/compression_report.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import invoke_cli
from llmctl.config import load_config
from llmctl.errors import ConfigError, StageInputError


def _tiny_model(hidden=64, inter=128, vocab=320):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_int8_replaces_every_linear_and_stays_close():
    import torch

    from llmctl.quantize import quantize_model

    m = _tiny_model()
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        ref = m(ids).logits
    info = quantize_model(m, "int8")
    assert info["method"] == "int8" and info["quantized_layers"] == 8  # 7 per layer + lm_head
    assert not any(type(x) is torch.nn.Linear for x in m.modules())
    assert any("quantized" in type(x).__module__ for x in m.modules())
    with torch.no_grad():
        out = m(ids).logits
    assert 0 < _rel_err(out, ref) < 0.05


def test_int4_keeps_layers_the_kernel_cannot_pack():
    import torch

    pytest.importorskip("torchao")
    from llmctl.quantize import quantize_model

    m = _tiny_model(hidden=64, inter=80)  # down_proj's input (80) is not a multiple of 32
    ids = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        ref = m(ids).logits
    info = quantize_model(m, "int4")
    assert info["kept"] == ["model.layers.0.mlp.down_proj"] and info["quantized_layers"] == 7
    assert m.dtype == torch.bfloat16
    with torch.no_grad():
        out = m(ids).logits.float()
    assert 0 < _rel_err(out, ref) < 0.25


def test_bad_methods_and_devices_are_config_errors():
    import torch

    from llmctl.quantize import check, quantize_model

    assert check("none") is None and check(None) is None
    with pytest.raises(ConfigError, match="eval.quantize 'int3'"):
        check("int3", key="eval.quantize")
    with pytest.raises(ConfigError, match="CPU"):
        check("int8", torch.device("cuda"))
    m = _tiny_model()
    m.config.quantization_config = {"quant_method": "torchao"}
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(m, "int8")


def test_cli_quantize_bad_value_is_exit_2(trained_run):
    path, cfg, rd = trained_run
    r = invoke_cli("generate", str(path), "--prompt", "the", "--quantize", "int3")
    assert r.returncode == 2 and "generate.quantize" in r.stderr and "Traceback" not in r.stderr


def test_generate_and_eval_with_int8(trained_run):
    path, cfg, rd = trained_run
    r = invoke_cli("generate", str(path), "--prompt", "the quick", "--quantize", "int8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["quantize"] == "int8" and out["results"][0]["completion_tokens"] > 0
    assert "Failed to load" not in r.stderr and "_pytree" not in r.stderr  # torchao's import chatter is silenced
    assert rd.manifest("generate")["headline"]["quantize"] == "int8"

    f32 = invoke_cli("eval", str(path), "--set", "eval.generation=false", "--json")
    q = invoke_cli("eval", str(path), "--set", "eval.generation=false", "--quantize", "int8", "--json")
    assert f32.returncode == 0 and q.returncode == 0, f32.stderr + q.stderr
    p32, p8 = json.loads(f32.stdout)["perplexity"], json.loads(q.stdout)["perplexity"]
    assert p8 != p32 and abs(p8 / p32 - 1) < 0.01
    res = json.loads(rd.results_path.read_text())
    assert res["quantization"]["method"] == "int8" and "quantize_dynamic" in res["quantization"]["library"]


def test_eval_int4(trained_run):
    pytest.importorskip("torchao")
    from llmctl.stages import evaluate

    path, cfg, rd = trained_run
    head = evaluate.run(load_config(path, ["eval.generation=false", "eval.quantize=int4"]), rd, force=True)
    assert head["quantize"] == "int4" and head["perplexity"] > 1


def test_hf_int8_export_gguf_eval_and_report(trained_run):
    pytest.importorskip("gguf")
    pytest.importorskip("torchao")
    from llmctl.stages import evaluate, export

    path, cfg, rd = trained_run
    cfg2 = load_config(path, ["export.formats=[gguf,hf-int8]", "export.gguf_types=[q8_0]", "export.report=true", "export.report_decode_tokens=2"])
    export.run(cfg2, rd)
    m = rd.manifest("export")
    assert m["verification"]["hf-int8"]["passed"]
    rows = {r["name"]: r for r in m["report"]["rows"]}
    assert list(rows) == ["f32 (train/model)", "hf-int8", "gguf q8_0", "f32 --quantize int8"]
    f32 = rows["f32 (train/model)"]
    assert f32["size_ratio"] == 1.0 and f32["ppl_delta_pct"] == 0.0 and f32["decode_tokens_per_s"] > 0
    assert m["report"]["perplexity_tokens"] > 0 and "validation" in m["report"]["perplexity_source"]
    assert m["report"]["seconds"] >= 0 and m["report"]["limit"] is None  # a tiny held-out set is never cut
    sizes = {"hf-int8": m["files"]["hf-int8/model.safetensors"]["size"], "gguf q8_0": m["files"]["gguf/model-q8_0.gguf"]["size"]}
    for name, size in sizes.items():
        r = rows[name]
        assert "error" not in r, r
        assert r["size_bytes"] == size and r["size_ratio"] == round(size / f32["size_bytes"], 4) < 1
        assert abs(r["ppl_delta_pct"]) < 1
    assert "decode_tokens_per_s" not in rows["gguf q8_0"]  # dequantized by transformers: not llama.cpp's speed
    assert rows["f32 --quantize int8"]["decode_speedup"] > 0 and rows["f32 --quantize int8"]["size_bytes"] is None

    # eval evaluates the GGUF file directly, on the same tokens: the same perplexity as the report
    gg = rd.export_dir("gguf") / "model-q8_0.gguf"
    head = evaluate.run(load_config(path, ["eval.generation=false"]), rd, model=str(gg))
    res = json.loads(rd.results_file(rd.other_eval_stage(str(gg))).read_text())
    assert res["model"]["path"] == str(gg) and res["model"]["weights"]["size"] == gg.stat().st_size
    assert "dequantized" in res["model"]["loader"]
    assert head["perplexity"] == pytest.approx(rows["gguf q8_0"]["perplexity"], rel=1e-6)


def test_hf_int8_reloads_without_llmctl(trained_run):
    pytest.importorskip("torchao")
    from llmctl.quantize import save_hf_int8

    path, cfg, rd = trained_run
    d = rd.root / "int8"
    save_hf_int8(rd.model_dir, d)
    code = (
        "import sys; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(d)!r})\n"
        "print(type(m.model.layers[0].mlp.up_proj.weight).__name__); assert 'llmctl' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert "Int8" in out.stdout or "Affine" in out.stdout


def test_export_prints_the_table(trained_run):
    path, cfg, rd = trained_run
    r = invoke_cli("export", str(path), "-f", "hf", "--set", "export.report=true", "--set", "export.report_decode_tokens=0")
    assert r.returncode == 0, r.stderr
    assert "artifact" in r.stderr and "perplexity" in r.stderr and "f32 --quantize int8" in r.stderr
    assert "Converting and de-quantizing" not in r.stderr
    rows = rd.manifest("export")["report"]["rows"]
    assert all(row.get("decode_tokens_per_s") is None for row in rows)


def test_model_path_must_be_a_dir_or_gguf(tmp_path, trained_run):
    from llmctl.modeling import resolve_model_path

    path, cfg, rd = trained_run
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(StageInputError, match=r"\.gguf file"):
        resolve_model_path(str(f), rd, cfg, "eval")
    g = tmp_path / "broken.gguf"
    g.write_bytes(b"not a gguf")
    r = invoke_cli("eval", str(path), "--model", str(g), "--set", "eval.generation=false")
    assert r.returncode == 3 and "broken.gguf" in r.stderr and "Traceback" not in r.stderr


def test_serve_with_int8_scores_with_the_int8_model(trained_run, tmp_path, sharp_model):
    """`serve --quantize int8` answers with the quantized model: its echoed prompt logprobs are
    the int8 model's teacher-forced ones, close to f32's but not f32's (a sharp model, so that
    quantization moves the numbers measurably)."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    import torch
    import yaml

    from conftest import SOURCE_WITH_BLANKS
    from llmctl.modeling import load_for_inference
    from test_serve import Server

    path, cfg, rd = trained_run
    sharp = sharp_model()
    d = yaml.safe_load(path.read_text())
    d["serve"] = {"quantize": "int8", "model_name": "q", "model": str(sharp)}
    qpath = path.parent / "serve-int8.yaml"
    qpath.write_text(yaml.safe_dump(d))
    prompt = SOURCE_WITH_BLANKS[:160]
    s = Server(qpath)
    try:
        assert any("quantized to int8" in line for line in s.lines), "".join(s.lines)
        r = httpx.post(s.url + "/v1/completions", json={"model": "q", "prompt": prompt, "max_tokens": 1, "temperature": 0,
                                                        "echo": True, "logprobs": 0}, timeout=60)
        assert r.status_code == 200, r.text
        served = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    finally:
        assert s.stop() == 0, "".join(s.lines)

    def forced(model, ids):
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        return torch.tensor([float(lp[k - 1, ids[k]]) for k in range(1, len(ids))])

    f32, tok = load_for_inference(str(sharp))
    q8, _ = load_for_inference(str(sharp), quantize="int8")
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    got = torch.tensor(served[1 : len(ids)])
    want_q, want_f = forced(q8, ids), forced(f32, ids)
    moved = float((want_q - want_f).abs().max())
    assert moved > 1e-3 and float((want_q - want_f).abs().mean()) < 0.1 * float(want_f.abs().mean()), (want_q, want_f)
    assert float((got - want_q).abs().max()) < moved / 20, (got, want_q, want_f)


def test_report_keeps_to_its_budget(tiny_cfg, tmp_path):
    """A report that would take longer than REPORT_BUDGET_X x the export scores the first tokens
    only (never fewer than REPORT_MIN_TOKENS) and says so; one that fits scores everything."""
    from conftest import train_tiny_tokenizer
    from llmctl import compression_report as report_x
    from llmctl.heldout import HeldOut

    path, cfg = tiny_cfg
    tok = train_tiny_tokenizer(["a b c d e f g"] * 20, tmp_path / "tok")
    m = _tiny_model(vocab=len(tok) + 8)
    held = HeldOut([[i % len(tok) for i in range(3 * report_x.REPORT_MIN_TOKENS)]], None, "test", 30000)
    cut, line = report_x.fit_to_budget(held, m, tok, cfg, n_rows=4, load_s=0.0, allowed_s=1e-3)
    assert cut.tokens == report_x.REPORT_MIN_TOKENS and cut.total_tokens == held.tokens
    assert line.startswith(f"report limited to the first {report_x.REPORT_MIN_TOKENS} of {held.tokens} held-out tokens") and "export.report_max_tokens" in line
    same, none = report_x.fit_to_budget(held, m, tok, cfg, n_rows=4, load_s=0.0, allowed_s=1e6)
    assert same is held and none is None
    small = HeldOut([[1, 2, 3] * 100], None, "test", 300)
    assert report_x.fit_to_budget(small, m, tok, cfg, n_rows=4, load_s=0.0, allowed_s=0.0) == (small, None)  # below the floor: never cut


def test_report_drops_decode_timing_past_its_budget(trained_run, monkeypatch):
    """When timing decode on every row would take the report past its budget, no row is timed and
    the report says so (a line in the table and in `limit`); perplexities are still measured."""
    from llmctl import compression_report as report_x
    from llmctl.stages import export

    monkeypatch.setattr(report_x, "REPORT_BUDGET_X", 1e-9)
    monkeypatch.setattr(report_x, "decode_tokens_per_s", lambda *a, **k: 0.01)  # a model that decodes slowly: timing is most of the cost
    path, cfg, rd = trained_run
    export.run(load_config(path, ["export.formats=[hf]", "export.report=true", "export.report_decode_tokens=4"]), rd, force=True)
    rep = rd.manifest("export")["report"]
    assert rep["limit"].startswith("decode tokens/s not measured") and rep["limit"] in report_x.table(rep)
    assert all(r.get("decode_tokens_per_s") is None and r.get("perplexity") for r in rep["rows"])
