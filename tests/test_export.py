"""`llmctl export`: round trips per format, dtype, sharding, checksums, failure paths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import invoke_cli
from llmctl.config import load_config
from llmctl.rundir import sha256_file
from llmctl.stages import export


def _logits(model, tok, text="the quick brown fox"):
    import torch

    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(ids).logits


def test_all_formats_round_trip_and_checksums(trained_run):
    path, cfg, rd = trained_run
    r = invoke_cli("export", str(path), "-f", "hf", "-f", "onnx", "-f", "gguf", "--set", "export.gguf_types=[f32,q8_0]", "--json")
    assert r.returncode == 0, r.stderr
    m = rd.manifest("export")
    assert m["status"] == "complete" and m["formats"] == ["hf", "onnx", "gguf"]
    for key in ("hf", "onnx", "gguf:f32", "gguf:q8_0"):
        v = m["verification"][key]
        assert v["passed"] and v["max_abs_diff"] <= v["tolerance"]
    assert m["verification"]["gguf:f32"]["max_abs_diff"] < 1e-4  # q/k permutation right
    for rel, info in m["files"].items():
        f = rd.stage_dir("export") / rel
        assert f.stat().st_size == info["size"] and sha256_file(f) == info["sha256"]
    assert (rd.export_dir("gguf") / "model-q8_0.gguf").is_file() and (rd.export_dir("onnx") / "tokenizer.json").is_file()
    card = (rd.export_dir("hf") / "README.md").read_text()
    assert "Training data" in card and "Lineage" in card
    # the hf export needs nothing from llmctl: load it in a clean interpreter
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(rd.export_dir('hf'))!r}); t = AutoTokenizer.from_pretrained({str(rd.export_dir('hf'))!r})\n"
        "ids = torch.tensor([t('the quick', add_special_tokens=False)['input_ids']]); print(m(ids).logits.shape[-1])\n"
        "assert 'llmctl' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    again = invoke_cli("export", str(path), "-f", "hf", "--set", "export.gguf_types=[f32,q8_0]", "--json")
    assert json.loads(again.stdout)["cached"] is True


def test_gguf_tokenizer_embedded(trained_run):
    from transformers import AutoTokenizer

    path, cfg, rd = trained_run
    cfg2 = load_config(path, ["export.formats=[gguf]", "export.gguf_types=[f16]"])
    export.run(cfg2, rd)
    g = AutoTokenizer.from_pretrained(rd.export_dir("gguf"), gguf_file="model-f16.gguf")
    t = AutoTokenizer.from_pretrained(rd.model_dir)
    text = "the quick brown fox jumps"
    assert g(text, add_special_tokens=False)["input_ids"] == t(text, add_special_tokens=False)["input_ids"]
    assert g.eos_token_id == t.eos_token_id


def test_dtype_and_sharding(trained_run):
    import torch
    from transformers import AutoModelForCausalLM

    path, cfg, rd = trained_run
    cfg2 = load_config(path, ["export.dtype=bfloat16", "export.max_shard_size=20KB"])
    res = export.run(cfg2, rd)
    shards = sorted(p.name for p in rd.export_dir("hf").glob("model-*.safetensors"))
    assert len(shards) > 1 and (rd.export_dir("hf") / "model.safetensors.index.json").is_file()
    m = AutoModelForCausalLM.from_pretrained(rd.export_dir("hf"))
    assert m.dtype == torch.bfloat16
    assert res["max_abs_diff"]["hf"] > 0  # bf16 rounding is measured, not hidden


def test_corrupted_export_fails_and_leaves_nothing(trained_run, monkeypatch):
    import torch

    from llmctl.errors import LlmctlError
    from llmctl.exporters import hf

    path, cfg, rd = trained_run
    real = hf.write

    def corrupt(model, tok, out, cfg, card):
        info = real(model, tok, out, cfg, card)
        from safetensors.torch import load_file, save_file

        f = out / "model.safetensors"
        sd = load_file(f)
        k = next(k for k in sd if "q_proj" in k)
        sd[k] = sd[k] + 1.0
        save_file(sd, f, metadata={"format": "pt"})
        return info

    monkeypatch.setattr(hf, "write", corrupt)
    with pytest.raises(LlmctlError, match="failed verification"):
        export.run(cfg, rd, force=True)
    assert rd.manifest("export")["status"] == "failed"
    assert not rd.export_dir("hf").exists()
    assert not [p for p in rd.stage_dir("export").iterdir() if p.name.startswith(".build")]
    assert torch  # used


def test_unsupported_architecture_for_gguf(tmp_path):
    from conftest import build_prepared_run, tiny_config_dict, write_config
    from llmctl.stages import train

    p = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run", model={"arch": "gpt2"}, train={"max_steps": 1}))
    cfg = load_config(p)
    rd = build_prepared_run(tmp_path / "run", cfg)
    train.run(cfg, rd)
    r = invoke_cli("export", str(p), "-f", "gguf")
    assert r.returncode == 2 and "gguf supports llama" in r.stderr and "'gpt2'" in r.stderr
    r = invoke_cli("export", str(p), "-f", "hf", "-f", "onnx")
    assert r.returncode == 0, r.stderr


def test_lora_merged_equals_adapter(tmp_path):
    from conftest import build_prepared_run, tiny_config_dict, write_config
    from llmctl.stages import train

    p = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run", model={"lora": {"enabled": True, "r": 4, "dropout": 0.0}}, train={"max_steps": 2, "lr": 0.05}))
    cfg = load_config(p)
    rd = build_prepared_run(tmp_path / "run", cfg)
    train.run(cfg, rd)
    export.run(cfg, rd)
    v = rd.manifest("export")["verification"]
    assert v["lora_merge"]["passed"] and v["lora_merge"]["max_abs_diff"] < 1e-4
    assert not (rd.export_dir("hf") / "adapter_config.json").exists()


def test_missing_train_and_bad_format(tiny_cfg):
    path, cfg = tiny_cfg
    r = invoke_cli("export", str(path))
    assert r.returncode == 3 and "llmctl" in r.stderr
    r = invoke_cli("export", str(path), "-f", "tflite")
    assert r.returncode == 2 and "tflite" in r.stderr


def test_a_signal_during_the_compression_report_stops_the_export(trained_run, monkeypatch):
    """SIGTERM/SIGINT while the report scores an artifact stops the export (143), not one row."""
    import signal

    from llmctl import modeling
    from llmctl.errors import Interrupted

    path, cfg, rd = trained_run
    cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"report": True})})

    def interrupted(*a, **k):
        raise Interrupted(signal.SIGTERM, "export interrupted")

    monkeypatch.setattr(modeling, "load_for_inference", interrupted)
    with pytest.raises(Interrupted):
        export.run(cfg, rd, force=True)
    assert rd.manifest("export")["status"] != "complete"
