"""Prompts past the context: cut from the left or stop at the context, never crash.

gpt2 has learned absolute positions: one position past `n_positions` is an IndexError.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import build_prepared_run, invoke_cli, sentences, tiny_config_dict, write_config
from llmctl.config import load_config
from llmctl.inference.context import fit_to_context
from llmctl.rundir import RunDir

CTX = 32


def _gpt2_run(tmp_path: Path, **sections) -> tuple[Path, RunDir]:
    """A prepared run plus RUN/train/model: a tiny random gpt2 with a 32-token context."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

    sections.setdefault("model", {}).update(arch="gpt2", context_length=CTX)
    sections.setdefault("data", {}).update(block_size=CTX)
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run", **sections))
    cfg = load_config(path)
    rd = build_prepared_run(Path(cfg.run.dir), cfg)
    tok = AutoTokenizer.from_pretrained(rd.tokenizer_dir)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=CTX,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    with rd.begin("train", cfg, inputs=["prepare"]) as st:
        model.save_pretrained(rd.model_dir)
        tok.save_pretrained(rd.model_dir)
        # No EOS in generation: every run goes to its token limit, so the counts are exact.
        GenerationConfig(pad_token_id=tok.pad_token_id).save_pretrained(rd.model_dir)
        st.headline.update({"steps": 0})
    return path, rd


def test_fit_to_context_rule():
    ids = [list(range(50)), list(range(5))]
    kept, new, cut = fit_to_context(ids, 8, 32)
    assert kept[0] == list(range(26, 50)) and kept[1] == list(range(5)) and new == 8 and cut == [26, 0]
    kept, new, cut = fit_to_context([list(range(10))], 100, 32)  # more new tokens than the context
    assert kept == [list(range(10))] and new == 22 and cut == [0]
    kept, new, cut = fit_to_context([list(range(40))], 100, 32)
    assert len(kept[0]) == 16 and new == 16
    assert fit_to_context(ids, 8, None) == (ids, 8, [0, 0])


def test_gpt2_generate_long_prompt_is_cut_not_crashed(tmp_path):
    path, rd = _gpt2_run(tmp_path, generate={"max_new_tokens": 8, "do_sample": False})
    long_prompt = " ".join(sentences(6, seed=4))  # well over 32 tokens
    r = invoke_cli("generate", str(path), "-p", long_prompt, "-p", "the fox", "--json")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "cut" in r.stderr and "32-token context" in r.stderr
    res = json.loads(r.stdout)["results"]
    assert res[0]["prompt_tokens"] == CTX - 8 and res[0]["completion_tokens"] == 8
    assert res[1]["completion_tokens"] == 8

    # More new tokens than the context holds: generation stops at the context.
    r = invoke_cli("generate", str(path), "-p", "the fox", "--json", "--set", "generate.max_new_tokens=100")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)["results"][0]
    assert rec["prompt_tokens"] + rec["completion_tokens"] == CTX and rec["finish_reason"] == "length"
    assert "at most" in r.stderr


def test_gpt2_eval_compare_init_with_long_generations(tmp_path):
    path, rd = _gpt2_run(tmp_path, eval={"max_new_tokens": 40, "compare_init": True, "stop": []})
    r = invoke_cli("eval", str(path), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert "Traceback" not in r.stderr and "at most" in r.stderr
    assert res["bleu"] is not None and res["init_bleu"] is not None and res["init_perplexity"] > 0
