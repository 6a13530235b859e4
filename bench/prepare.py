"""Tokens/s and peak RSS of `llmctl prepare` vs transformers' run_clm.py recipe, and the limit.

Both sides read the same corpus file on disk (the builtin stdlib corpus written once as
JSONL, one document per line), use the same trained tokenizer and block size, and start
with empty caches. The baseline is run_clm.py's own preprocessing: `load_dataset("json",
data_files=...)` -> batched `map(tokenize)` -> batched `map(group_texts)` (single process,
its defaults). Each run is a fresh process timed from outside the same way (wall clock from
spawn to exit, imports included) with its own peak RSS from wait4; the sides alternate and
each keeps its best of ROUNDS. The limit is the raw `tokenizers` `encode_batch` on the same
documents (Rust, all cores, nothing written).

BENCH_PREPARE_BYTES caps the corpus (default 12 MB).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, ratio, write_result

BLOCK = 256
MAX_BYTES = int(os.environ.get("BENCH_PREPARE_BYTES", 12_000_000))
ROUNDS = 3

# transformers/examples/pytorch/language-modeling/run_clm.py, its data path, defaults kept.
RUN_CLM = r'''
import sys
from itertools import chain
from datasets import load_dataset
from transformers import AutoTokenizer
corpus, tok_dir, cache_dir, block_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
raw_datasets = load_dataset("json", data_files={"train": corpus}, cache_dir=cache_dir)
tokenizer = AutoTokenizer.from_pretrained(tok_dir)
column_names = list(raw_datasets["train"].features)
text_column_name = "text" if "text" in column_names else column_names[0]
def tokenize_function(examples):
    return tokenizer(examples[text_column_name])
tokenized_datasets = raw_datasets.map(tokenize_function, batched=True, remove_columns=column_names, desc="Running tokenizer on dataset")
def group_texts(examples):
    concatenated_examples = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated_examples[list(examples.keys())[0]])
    total_length = (total_length // block_size) * block_size
    result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated_examples.items()}
    result["labels"] = result["input_ids"].copy()
    return result
lm_datasets = tokenized_datasets.map(group_texts, batched=True, desc=f"Grouping texts in chunks of {block_size}")
print(len(lm_datasets["train"]))
'''

ENCODE_BATCH = r'''
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
docs = [json.loads(line)["text"] for line in open(sys.argv[2])]
best = None
for _ in range(int(sys.argv[3])):
    t0 = time.perf_counter()
    n = sum(len(e.ids) for e in tok.encode_batch(docs))
    dt = time.perf_counter() - t0
    best = dt if best is None else min(best, dt)
print(json.dumps({"tokens": n, "seconds": best}))
'''


def timed(cmd: list[str], env: dict) -> tuple[dict, str]:
    """Wall seconds from spawn to exit and the child's own peak RSS (MB); and its stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        dt = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if p.returncode != 0:
            raise SystemExit(f"{cmd[:4]} failed ({p.returncode}):\n{err.read().decode(errors='replace')[-2000:]}")
        return {"seconds": round(dt, 3), "rss_mb": round(ru.ru_maxrss / 1024, 1)}, out.read().decode()


def main() -> None:
    import yaml
    from datasets import load_from_disk

    from llmctl.data.sources import Counters, builtin_files, iter_builtin

    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    corpus = tmp / "corpus.jsonl"
    with open(corpus, "w") as f:
        for rec, _ in iter_builtin(builtin_files(42, MAX_BYTES), Counters()):
            f.write(json.dumps({"text": rec["text"]}) + "\n")
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "true"}

    # One tokenizer for both sides, trained once by llmctl (not timed).
    tok_run = tmp / "tokrun"
    cfg_tok = tmp / "tok.yaml"
    cfg_tok.write_text(yaml.safe_dump({"run": {"name": "b", "dir": str(tok_run)},
                                       "data": {"source": "files", "paths": [str(corpus)], "block_size": BLOCK, "validation_fraction": 0.0,
                                                "curate": {"enabled": False}},
                                       "tokenizer": {"vocab_size": 8192}, "model": {"context_length": 1024}}))
    subprocess.run([sys.executable, "-m", "llmctl", "prepare", str(cfg_tok), "-q"], check=True, env=env)
    tok_dir = tmp / "tok"
    shutil.copytree(tok_run / "prepare" / "tokenizer", tok_dir)
    cfg = tmp / "c.yaml"
    # Curation off: run_clm.py does none, and bench/curate.py measures its share on its own.
    cfg.write_text(yaml.safe_dump({"run": {"name": "b", "dir": str(tmp / "run")},
                                   "data": {"source": "files", "paths": [str(corpus)], "block_size": BLOCK, "validation_fraction": 0.0,
                                            "curate": {"enabled": False}},
                                   "tokenizer": {"name_or_path": str(tok_dir)}, "model": {"context_length": 1024}}))

    def ours() -> dict:
        shutil.rmtree(tmp / "run", ignore_errors=True)
        r, _ = timed([sys.executable, "-m", "llmctl", "prepare", str(cfg), "-q"], env)
        r["tokens"] = load_from_disk(str(tmp / "run" / "prepare" / "dataset"))["train"].num_rows * BLOCK
        return r

    def theirs() -> dict:
        cache = tmp / "hf-cache"
        shutil.rmtree(cache, ignore_errors=True)
        r, out = timed([sys.executable, "-c", RUN_CLM, str(corpus), str(tok_dir), str(cache), str(BLOCK)], env)
        r["tokens"] = int(out.strip().splitlines()[-1]) * BLOCK  # rows of the grouped dataset
        return r

    runs: dict[str, list[dict]] = {"llmctl": [], "run_clm": []}
    for k in range(ROUNDS):  # alternate, so drift in machine load hits both sides
        order = [("llmctl", ours), ("run_clm", theirs)]
        for name, fn in order if k % 2 == 0 else order[::-1]:
            runs[name].append(fn())
            print(f"[prepare] round {k + 1} {name}: {runs[name][-1]}", flush=True)
    enc = json.loads(subprocess.run([sys.executable, "-c", ENCODE_BATCH, str(tok_dir / "tokenizer.json"), str(corpus), str(ROUNDS)],
                                    check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1])

    def best(rs: list[dict]) -> dict:
        b = min(rs, key=lambda r: r["seconds"])
        return {**b, "tokens_per_s": round(b["tokens"] / b["seconds"], 1), "peak_rss_mb": max(r["rss_mb"] for r in rs),
                "all_seconds": [r["seconds"] for r in rs]}

    o, t = best(runs["llmctl"]), best(runs["run_clm"])
    limit = round(enc["tokens"] / enc["seconds"], 1)
    metrics = {"llmctl": o, "run_clm": t, "encode_batch_tokens_per_s": limit, "encode_batch_tokens": enc["tokens"],
               "corpus_bytes": corpus.stat().st_size, "documents": sum(1 for _ in open(corpus)), "block_size": BLOCK,
               "rounds": ROUNDS, "machine": machine()}
    write_result("prepare", metrics, model_params=None, ratios={
        "prepare tokens/s vs run_clm.py recipe": ratio(o["tokens_per_s"] / t["tokens_per_s"], 1.0),
        "prepare peak RSS vs run_clm.py recipe (lower better)": ratio(o["peak_rss_mb"] / t["peak_rss_mb"], 1.0, higher_is_better=False),
        "prepare tokens/s vs raw encode_batch (the limit)": ratio(o["tokens_per_s"] / limit, None),
    })
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
