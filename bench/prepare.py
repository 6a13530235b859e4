"""Tokens/s and peak RSS of `llmctl prepare` vs run_clm's datasets.map + group_texts recipe.

Same corpus (the builtin stdlib corpus), same trained tokenizer, same block size; each side
in its own process so peak RSS is its own. Tokenizer training is excluded from both.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ratio, write_result

BLOCK = 256
MAX_BYTES = 12_000_000

LLMCTL = r'''
import json, resource, sys, time
from llmctl.config import load_config
from llmctl.rundir import RunDir
from llmctl.stages import prepare
cfg = load_config(sys.argv[1], sys.argv[2:])
t0 = time.perf_counter()
res = prepare.run(cfg, RunDir(cfg.run.dir), force=True)
dt = time.perf_counter() - t0
stats = json.loads(RunDir(cfg.run.dir).stats_path.read_text())
tokens = sum(s["tokens"] for s in stats["splits"].values())
print(json.dumps({"seconds": dt, "tokens": tokens, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''

BASELINE = r'''
import json, resource, sys, time
from itertools import chain
from datasets import Dataset, disable_progress_bars
from transformers import AutoTokenizer
from llmctl.data.sources import Counters, builtin_files, iter_builtin
disable_progress_bars()
tok_dir, out, block, max_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
docs = [r["text"] for r, _ in iter_builtin(builtin_files(42, max_bytes), Counters())]
t0 = time.perf_counter()
tok = AutoTokenizer.from_pretrained(tok_dir)
raw = Dataset.from_dict({"text": docs})
def tokenize(ex):
    out = tok(ex["text"])
    out["input_ids"] = [ids + [tok.eos_token_id] for ids in out["input_ids"]]
    out["attention_mask"] = [m + [1] for m in out["attention_mask"]]
    return out
def group_texts(examples):  # transformers' run_clm.py
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total = (len(concatenated["input_ids"]) // block) * block
    result = {k: [t[i : i + block] for i in range(0, total, block)] for k, t in concatenated.items()}
    result["labels"] = result["input_ids"].copy()
    return result
ds = raw.map(tokenize, batched=True, remove_columns=["text"])
tokens = sum(len(x) for x in ds["input_ids"])
ds = ds.map(group_texts, batched=True)
ds.save_to_disk(out)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "tokens": tokens, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def main() -> None:
    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    base = {"run": {"name": "b", "dir": str(tmp / "run")}, "data": {"source": "builtin", "block_size": BLOCK, "max_bytes": MAX_BYTES, "validation_fraction": 0.0},
            "tokenizer": {"vocab_size": 8192}, "model": {"context_length": 1024}}
    cfg = tmp / "c.yaml"
    cfg.write_text(yaml.safe_dump(base))
    subprocess.run([sys.executable, "-m", "llmctl", "prepare", str(cfg), "-q"], check=True)  # trains the tokenizer once
    tok_dir = tmp / "tok"
    subprocess.run(["cp", "-r", str(tmp / "run" / "prepare" / "tokenizer"), str(tok_dir)], check=True)
    ours = json.loads(subprocess.run([sys.executable, "-c", LLMCTL, str(cfg), f"tokenizer.name_or_path={tok_dir}"], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    theirs = json.loads(subprocess.run([sys.executable, "-c", BASELINE, str(tok_dir), str(tmp / "baseline"), str(BLOCK), str(MAX_BYTES)], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    ours["tokens_per_s"] = ours["tokens"] / ours["seconds"]
    theirs["tokens_per_s"] = theirs["tokens"] / theirs["seconds"]
    metrics = {"llmctl": ours, "run_clm_baseline": theirs, "corpus_bytes_cap": MAX_BYTES, "block_size": BLOCK}
    write_result("prepare", metrics, {
        "prepare tokens/s vs run_clm map+group_texts": ratio(ours["tokens_per_s"] / theirs["tokens_per_s"], 1.0),
        "prepare peak RSS vs run_clm (lower better)": ratio(ours["rss_mb"] / theirs["rss_mb"], 1.0, higher_is_better=False),
    })


if __name__ == "__main__":
    main()
