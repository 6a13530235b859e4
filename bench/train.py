"""Tokens/s of `llmctl train` vs a bare PyTorch loop, and MFU against a measured matmul peak.

Same model (quickstart llama, seeded), same prepared data, batch, AdamW (fused), cosine
schedule, clipping, steps. Both sides skip the first WARMUP steps (allocator and kernel
warm-up) and time the rest; llmctl's time comes from its own metrics.jsonl timestamps.
The two sides alternate REPS times and each keeps its best run: on a shared or virtual
machine, run-to-run noise is larger than the difference being measured.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ratio, write_result

STEPS, WARMUP, BATCH, BLOCK, REPS = 60, 10, 16, 128, 3


def matmul_peak_flops(n: int = 1024, reps: int = 20) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):  # best of 5: the machine's noise only ever makes it slower
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def bare_loop(cfg, rd) -> float:
    """tokens/s of a plain loop over the same batches."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, get_cosine_with_min_lr_schedule_with_warmup

    from llmctl.modeling import build_from_scratch

    tok = AutoTokenizer.from_pretrained(rd.tokenizer_dir)
    model = build_from_scratch(cfg, tok).train()
    ds = load_from_disk(str(rd.dataset_dir))["train"].with_format("torch")
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(ds), generator=g)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), fused=True)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, cfg.train.warmup_steps, STEPS, min_lr_rate=cfg.train.min_lr_ratio)
    t_start = None
    for step in range(STEPS):
        if step == WARMUP:
            t_start = time.perf_counter()
        idx = order[step * BATCH : (step + 1) * BATCH]
        batch = ds[idx]
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return (STEPS - WARMUP) * BATCH * BLOCK / (time.perf_counter() - t_start)


def main() -> None:
    import yaml

    from llmctl.config import load_config
    from llmctl.rundir import RunDir

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    d = {"run": {"name": "b", "dir": str(tmp / "run")},
         "data": {"source": "builtin", "block_size": BLOCK, "max_bytes": 3_000_000},
         "tokenizer": {"vocab_size": 4096},
         "model": {"n_layers": 4, "n_heads": 4, "hidden_size": 128, "context_length": 256},
         "train": {"max_steps": STEPS, "micro_batch_size": BATCH, "warmup_steps": 5, "eval_every": 100000, "save_every": 100000, "log_every": 1, "lr": 1e-3}}
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    subprocess.run([sys.executable, "-m", "llmctl", "prepare", str(path), "-q"], check=True)
    cfg = load_config(path)
    rd = RunDir(cfg.run.dir)
    ours_runs, theirs_runs = [], []
    for _ in range(REPS):
        subprocess.run([sys.executable, "-m", "llmctl", "train", str(path), "-q", "--force"], check=True)
        recs = [json.loads(x) for x in rd.metrics_path.read_text().splitlines()]
        recs = {r["step"]: r for r in recs if "loss" in r}
        ours_runs.append((recs[STEPS]["tokens"] - recs[WARMUP]["tokens"]) / (recs[STEPS]["elapsed_s"] - recs[WARMUP]["elapsed_s"]))
        theirs_runs.append(bare_loop(cfg, rd))
    ours, theirs = max(ours_runs), max(theirs_runs)
    peak = matmul_peak_flops()
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(rd.model_dir)
    n_params = sum(p.numel() for p in m.parameters())
    c = m.config
    flops_per_token = 6 * n_params + 12 * c.num_hidden_layers * c.hidden_size * BLOCK
    metrics = {"llmctl_tokens_per_s": round(ours, 1), "bare_loop_tokens_per_s": round(theirs, 1),
               "params": n_params, "matmul_peak_gflops": round(peak / 1e9, 2),
               "llmctl_mfu": round(ours * flops_per_token / peak, 4), "bare_mfu": round(theirs * flops_per_token / peak, 4),
               "steps_timed": STEPS - WARMUP, "batch": BATCH, "block": BLOCK,
               "llmctl_runs": [round(x, 1) for x in ours_runs], "bare_runs": [round(x, 1) for x in theirs_runs]}
    write_result("train", metrics, {"train tokens/s llmctl vs bare PyTorch": ratio(ours / theirs, 0.95)})
    assert math.isfinite(ours)


if __name__ == "__main__":
    main()
