"""Peak RSS of `llmctl prepare` as the corpus grows (issue #30: data larger than memory), and its time
against the same job in plain `datasets`.

A synthetic corpus (Zipf-distributed words from a 20k-word vocabulary, ~2 KB documents, distinct so
dedup keeps them) is written as 64 MB JSONL shards, at each size in BENCH_SCALE_MB (default
"32,128"; the issue's sizes are "1024,4096": about 10 and 40 minutes of tokenizing each on an idle
2-core machine). One tokenizer, trained once, serves every run. For each size:
- llmctl prepare, curation off (the job plain datasets does) and curation on (exact + near dedup and
  leakage: their indexes are what grows with the document count; quality, language and PII off);
- plain datasets: load_dataset("json") -> map(tokenize) -> map(group_texts) -> save_to_disk, the same
  num_proc (1).
Each is a fresh process, its wall time from spawn to exit, its peak RSS from wait4 (which counts the
pages of memory-mapped Arrow files it read: page cache the kernel can drop) and its peak anonymous
memory (RssAnon, sampled every 0.1 s: the memory it cannot give back). BENCH_SCALE_SIDES picks sides
(default "llmctl,llmctl_curated,datasets"; at the sizes bench/results.json has, the sides not run keep
their rows there); BENCH_SCALE_DEDUP_MB sets data.curate.dedup_memory_mb for the
curated side (the memory its dedup index may hold before it spills to disk: a small value shows at small
sizes what the default shows at large ones).

    BENCH_SCALE_MB=1024,4096 python bench/prepare_scale.py
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine, ratio, write_result

BLOCK = 256
SIZES = [int(x) for x in os.environ.get("BENCH_SCALE_MB", "32,128").split(",")]
SHARD = 64 << 20
SIDES = os.environ.get("BENCH_SCALE_SIDES", "llmctl,llmctl_curated,datasets").split(",")
DEDUP_MB = int(os.environ.get("BENCH_SCALE_DEDUP_MB", "0"))  # data.curate.dedup_memory_mb; 0: its default
PLAIN_MAX_MB = int(os.environ.get("BENCH_SCALE_PLAIN_MAX_MB", str(1 << 30)))  # the datasets side only up to this size (it is the slower one)


def timed(cmd: list[str], env: dict) -> tuple[dict, str]:
    """Wall seconds, peak RSS (wait4) and peak anonymous memory (RssAnon, sampled) in MB; and stdout."""
    import time

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        anon = 0
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            try:
                line = next(x for x in open(f"/proc/{p.pid}/status") if x.startswith("RssAnon:"))
                anon = max(anon, int(line.split()[1]))
            except (OSError, StopIteration):
                pass
            time.sleep(0.1)
        dt = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if code != 0:
            raise SystemExit(f"{cmd[:4]} failed ({code}):\n{err.read().decode(errors='replace')[-2000:]}")
        return {"seconds": round(dt, 3), "rss_mb": round(ru.ru_maxrss / 1024, 1), "anon_mb": round(anon / 1024, 1)}, out.read().decode()

PLAIN = r'''
import sys
from itertools import chain
from datasets import load_dataset
from transformers import AutoTokenizer
files, tok_dir, cache, out, block = sys.argv[1].split(","), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
raw = load_dataset("json", data_files={"train": files}, cache_dir=cache)
tok = AutoTokenizer.from_pretrained(tok_dir)
def tokenize(b):
    return {"input_ids": [ids + [tok.eos_token_id] for ids in tok(b["text"], add_special_tokens=False)["input_ids"]]}
ds = raw.map(tokenize, batched=True, remove_columns=["text"])
def group(b):
    ids = list(chain(*b["input_ids"]))
    n = len(ids) // block * block
    blocks = [ids[i:i + block] for i in range(0, n, block)]
    return {"input_ids": blocks, "labels": [list(x) for x in blocks]}
ds = ds.map(group, batched=True)
ds.save_to_disk(out)
print(ds["train"].num_rows)
'''


def corpus(d: Path, mb: int, seed: int = 0) -> list[Path]:
    """`mb` MB of distinct synthetic documents in 64 MB JSONL shards: 330 Zipf-drawn words each, in
    sentences of 11. The words are drawn with numpy, a shard's worth at a time (a word at a time in
    Python took 5 minutes a GB)."""
    import numpy as np

    rng = random.Random(seed)
    vocab = np.array(["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(20000)], dtype=object)
    p = 1 / np.arange(1, len(vocab) + 1)
    gen = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    files, written = [], 0
    while written < mb << 20:
        files.append(d / f"shard-{len(files):04d}.jsonl")
        with open(files[-1], "w") as f:
            while f.tell() < SHARD and written < mb << 20:
                words = vocab[gen.choice(len(vocab), size=(1024, 30, 11), p=p / p.sum())]
                lines = []
                for doc in words:
                    text = " ".join(" ".join(s).capitalize() + "." for s in doc)
                    lines.append(json.dumps({"text": text}) + "\n")
                chunk = "".join(lines)
                f.write(chunk)
                written += len(chunk)
    return files


def config(tmp: Path, name: str, files: list[Path], tok: Path | None, curate: bool) -> Path:
    import yaml

    cur = {"enabled": curate, "quality": {"enabled": False}, "language": False, "pii": {"action": "off"}} if curate else {"enabled": False}
    if curate and DEDUP_MB:
        cur["dedup_memory_mb"] = DEDUP_MB
    data = {"source": "files", "paths": [str(f) for f in files], "block_size": BLOCK, "validation_fraction": 0.01, "curate": cur}
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"run": {"name": name, "dir": str(tmp / name)}, "data": data,
                                 "tokenizer": {"name_or_path": str(tok)} if tok else {"vocab_size": 8192, "max_train_bytes": 20_000_000},
                                 "model": {"context_length": 1024}}))
    return p


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    first = corpus(tmp / "c0", 8)
    subprocess.run([sys.executable, "-m", "llmctl", "prepare", str(config(tmp, "tok", first, None, False)), "-q"], check=True, env=env)
    tok = tmp / "tok" / "prepare" / "tokenizer"
    rows = {}
    for mb in SIZES:
        files = corpus(tmp / f"c{mb}", mb)
        row = {"bytes": sum(f.stat().st_size for f in files)}
        for name, cur in (("llmctl", False), ("llmctl_curated", True)):
            if name in SIDES:
                cfg = config(tmp, f"{name}-{mb}", files, tok, cur)
                load = os.getloadavg()[0]
                row[name], _ = timed([sys.executable, "-m", "llmctl", "prepare", str(cfg), "-q"], env)
                row[name]["load_avg_1m_start"] = round(load, 2)
                shutil.rmtree(tmp / f"{name}-{mb}", ignore_errors=True)
        if "datasets" in SIDES and mb <= PLAIN_MAX_MB:
            row["datasets"], _ = timed([sys.executable, "-c", PLAIN, ",".join(map(str, files)), str(tok), str(tmp / "hf-cache"),
                                        str(tmp / "plain-out"), str(BLOCK)], env)
        shutil.rmtree(tmp / "hf-cache", ignore_errors=True)
        shutil.rmtree(tmp / "plain-out", ignore_errors=True)
        shutil.rmtree(tmp / f"c{mb}", ignore_errors=True)
        rows[mb] = row
        print(f"[prepare_scale] {mb} MB: {json.dumps(row)}", flush=True)
    summarize(rows)
    shutil.rmtree(tmp, ignore_errors=True)


def summarize(rows: dict) -> None:
    """bench/results/prepare_scale.json from the rows measured ({size MB: {side: numbers}})."""
    # sides not run this time keep their rows from bench/results.json (same sizes): one side can be rerun alone
    kept = (json.loads((Path(__file__).resolve().parent / "results.json").read_text()).get("prepare_scale") or {}).get("metrics") or {}
    if kept.get("sizes_mb") == SIZES:
        for mb in SIZES:
            old = kept["runs"].get(str(mb)) or {}
            rows[mb] = {**{k: v for k, v in old.items() if k not in rows[mb]}, **rows[mb]}
    sides = [k for k in ("llmctl", "llmctl_curated", "datasets") if any(k in r for r in rows.values())]
    lo, hi = rows[SIZES[0]], rows[SIZES[-1]]
    growth = {f"{k}.{m}": round(hi[k][m] / lo[k][m] - 1, 3) for k in sides for m in ("rss_mb", "anon_mb") if k in lo and k in hi}
    ratios = {f"{k} peak {m.split('_')[0]} growth {SIZES[0]} -> {SIZES[-1]} MB (lower better)": ratio(1 + growth[f"{k}.{m}"], 1.2, higher_is_better=False)
              for k in sides if k.startswith("llmctl") for m in ("rss_mb", "anon_mb") if f"{k}.{m}" in growth}
    both = [mb for mb in SIZES if {"llmctl", "datasets"} <= set(rows[mb])]
    if both:  # the largest size both sides ran
        ratios[f"prepare speed vs plain datasets at {both[-1]} MB"] = ratio(rows[both[-1]]["datasets"]["seconds"] / rows[both[-1]]["llmctl"]["seconds"], 1.0)
    write_result("prepare_scale", {"sizes_mb": SIZES, "runs": rows, "growth": growth, "plain_max_mb": min(PLAIN_MAX_MB, SIZES[-1]), "machine": machine()}, ratios)


if __name__ == "__main__":
    main()
