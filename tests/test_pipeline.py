"""`llmctl run`: every stage through the real CLI, then a second run that skips everything."""

from __future__ import annotations

import json

from conftest import invoke_cli, write_config
from llmctl.rundir import RunDir

TINY = {
    "run": {"name": "e2e", "seed": 1},
    "data": {"source": "builtin", "max_bytes": 200_000, "block_size": 32, "validation_fraction": 0.2},
    "tokenizer": {"vocab_size": 400},
    "model": {"n_layers": 1, "n_heads": 2, "hidden_size": 32, "context_length": 64},
    "train": {"max_steps": 4, "eval_every": 2, "save_every": 2, "micro_batch_size": 4},
    "eval": {"max_examples": 4, "max_new_tokens": 4, "compare_init": True},
    "generate": {"prompts": ["def main():"], "max_new_tokens": 4},
    "export": {"formats": ["hf", "gguf"], "gguf_types": ["q8_0"]},
}


def test_run_end_to_end_then_skips(tmp_path):
    d = json.loads(json.dumps(TINY))
    d["run"]["dir"] = str(tmp_path / "run")
    path = write_config(tmp_path / "c.yaml", d)
    r = invoke_cli("run", str(path), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["ran"] == ["prepare", "train", "eval", "generate", "export"] and out["skipped_up_to_date"] == []
    for key in ("data", "model", "training", "eval_perplexity", "sample", "exports_mb"):
        assert key in out, key
    assert "bleu" in out or "chrf" in out
    assert isinstance(out["training"]["steps"], int) and isinstance(out["eval_perplexity"]["after"], float)
    rd = RunDir(tmp_path / "run")
    for stage in ("prepare", "train", "eval", "generate", "export"):
        m = rd.manifest(stage)
        assert m["status"] == "complete" and m["finished_at"], stage
    assert rd.manifest("train")["lineage"]["prepare"]["id"] == rd.manifest("prepare")["id"]

    again = invoke_cli("run", str(path), "--json")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["ran"] == []
    assert json.loads(again.stdout)["skipped_up_to_date"] == ["prepare", "train", "eval", "generate", "export"]

    # a changed eval config re-runs only eval, --from/--to pick a range
    r = invoke_cli("run", str(path), "--json", "--from", "eval", "--to", "eval", "--set", "eval.max_new_tokens=3")
    assert r.returncode == 0 and json.loads(r.stdout)["ran"] == ["eval"]


def test_run_stops_at_first_failure_with_its_code(tmp_path):
    d = json.loads(json.dumps(TINY))
    d["run"]["dir"] = str(tmp_path / "run")
    d["data"] = {"source": "files", "paths": [str(tmp_path / "missing.txt")], "block_size": 32}
    path = write_config(tmp_path / "c.yaml", d)
    r = invoke_cli("run", str(path))
    assert r.returncode == 2 and "missing.txt" in r.stderr
    assert RunDir(tmp_path / "run").manifest("train") is None


def _fake_run(tmp_path, eval_headline):
    from conftest import tiny_config_dict
    from llmctl.config import load_config

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run")))
    rd = RunDir(tmp_path / "run")
    heads = {
        "prepare": {"documents": 10, "train_tokens": 1000, "vocab_size": 300},
        "train": {"steps": 4, "seconds": 1.5, "parameters": 12345, "tokens_per_s": None, "init_val_ppl": 300.0, "val_ppl": 120.5},
        "eval": eval_headline,
    }
    for stage, head in heads.items():
        with rd.begin(stage, cfg) as st:
            st.headline.update(head)
    return rd


def test_run_summary_numbers_are_numbers(tmp_path):
    from llmctl.pipeline import summarize

    rd = _fake_run(tmp_path, {"perplexity": 50.25, "bleu": 12.5, "chrf": 30.0, "exact_match": 0.1, "examples": 8, "baseline_copy_bleu": 1.0})
    out = json.loads(json.dumps(summarize(rd)))
    assert out["data"] == {"documents": 10, "train_tokens": 1000, "vocab_size": 300}
    assert out["training"] == {"steps": 4, "seconds": 1.5, "val_perplexity_before": 300.0, "val_perplexity_after": 120.5}
    assert out["eval_perplexity"] == {"after": 50.25}  # nothing measured is shown as "?" or a string
    assert out["bleu"] == {"after": 12.5, "copy_prompt_baseline": 1.0, "pairs": 8}
    assert "?" not in json.dumps(out)


def test_run_summary_leads_with_chrf_when_bleu_is_degenerate(tmp_path):
    from llmctl.metrics import text_metrics
    from llmctl.pipeline import summarize

    short = text_metrics(["blue", "red cat"], ["blue", "red dog"])
    assert short["bleu"] == 0 and short["exact_match"] == 0.5 and short["bleu_degenerate"] is True
    assert "shorter than 4 tokens" in short["bleu_note"]
    assert "bleu_degenerate" not in text_metrics(["the cat sat on the mat"], ["the cat sat on a mat"])
    rd = _fake_run(tmp_path, {"bleu": 0.0, "chrf": 61.0, "exact_match": 0.5, "examples": 2, "bleu_degenerate": True, "init_chrf": 10.0, "baseline_copy_chrf": 5.0})
    out = summarize(rd)
    assert "bleu" not in out and out["chrf"] == {"before": 10.0, "after": 61.0, "copy_prompt_baseline": 5.0, "pairs": 2}
    assert out["exact_match"] == {"after": 0.5} and "shorter than 4 tokens" in out["bleu_degenerate"]
