"""`llmctl run`: every stage through the real CLI, then a second run that skips everything."""

from __future__ import annotations

import json

from conftest import run_cli, write_config
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
    r = run_cli("run", str(path), "--json", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["ran"] == ["prepare", "train", "eval", "generate", "export"] and out["skipped_up_to_date"] == []
    for key in ("data", "model", "training", "eval_perplexity_before_after", "bleu_before_after", "sample", "exports"):
        assert key in out, key
    rd = RunDir(tmp_path / "run")
    for stage in ("prepare", "train", "eval", "generate", "export"):
        m = rd.manifest(stage)
        assert m["status"] == "complete" and m["finished_at"], stage
    assert rd.manifest("train")["lineage"]["prepare"]["id"] == rd.manifest("prepare")["id"]

    again = run_cli("run", str(path), "--json", timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["ran"] == []
    assert json.loads(again.stdout)["skipped_up_to_date"] == ["prepare", "train", "eval", "generate", "export"]

    # a changed eval config re-runs only eval, --from/--to pick a range
    r = run_cli("run", str(path), "--json", "--from", "eval", "--to", "eval", "--set", "eval.max_new_tokens=3")
    assert r.returncode == 0 and json.loads(r.stdout)["ran"] == ["eval"]


def test_run_stops_at_first_failure_with_its_code(tmp_path):
    d = json.loads(json.dumps(TINY))
    d["run"]["dir"] = str(tmp_path / "run")
    d["data"] = {"source": "files", "paths": [str(tmp_path / "missing.txt")], "block_size": 32}
    path = write_config(tmp_path / "c.yaml", d)
    r = run_cli("run", str(path))
    assert r.returncode == 2 and "missing.txt" in r.stderr
    assert RunDir(tmp_path / "run").manifest("train") is None
