"""DPO: `llmctl train` (train.method=dpo) vs a bare TRL DPOTrainer script, and LoRA-DPO's memory.

1. Optimizer steps/s and peak RSS of llmctl's DPO training against a bare TRL `DPOTrainer`
   script: same model (the quickstart-sized llama of bench/_model.py), same prepared pairs,
   batch, max length, beta, lr, seed, steps and AdamW/schedule settings, a frozen deep copy as the reference on both
   sides. Each side runs in a fresh subprocess, the two alternate ROUNDS times, medians are
   kept (an even ROUNDS: each side goes first equally often). Both skip the first WARMUP optimizer steps and time steps WARMUP..STEPS: llmctl's from
   its metrics.jsonl `elapsed_s` (log_every=LOG), the bare script's from a callback at the same
   steps (on_step_end; logging_steps=LOG too). TRL's own DPOConfig defaults (bf16 autocast,
   gradient checkpointing) are turned off on the bare side, as llmctl does on CPU. Peak RSS is each child's own ru_maxrss (os.wait4).
2. Peak RSS of LoRA-DPO (reference = the base with the adapter disabled) against full DPO
   (trainable weights + frozen reference copy + gradients + AdamW state), both `llmctl train`,
   same model. On a ~1.3M-parameter model the process's fixed costs (Python, torch,
   transformers, TRL: several hundred MB) dwarf the ~26 MB of weight-sized state full DPO keeps,
   so the measured ratio is near 1; the metrics give the weight-state estimate and the model size
   at which that state would equal the fixed cost.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from common import machine, ratio, write_result

STEPS, WARMUP, LOG, BATCH, BLOCK, BETA, LR, ROUNDS, N_PAIRS = 40, 5, 5, 8, 128, 0.1, 5e-5, 4, 600
HERE = Path(__file__).resolve().parent

BARE = textwrap.dedent('''
    import copy, json, sys, time
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    model_dir, data_dir, out_dir, steps, warmup, log, batch, block, beta, lr = sys.argv[1:11]
    steps, warmup, log, batch, block, beta, lr = int(steps), int(warmup), int(log), int(batch), int(block), float(beta), float(lr)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = copy.deepcopy(model).requires_grad_(False)
    ds = load_from_disk(data_dir)["train"].with_format(None)
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (warmup, steps):
                marks[state.global_step] = time.perf_counter()

    args = DPOConfig(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                     beta=beta, max_length=block, logging_steps=log, save_strategy="no", report_to=[],
                     use_cpu=True, seed=42, data_seed=42, disable_tqdm=True, remove_unused_columns=False,
                     # llmctl's train.* defaults as it passes them, so both run the same optimizer work
                     # TRL's own defaults are bf16 autocast and gradient checkpointing; llmctl passes fp32
                     # and no checkpointing on CPU, so the bare side does too (like for like)
                     bf16=False, gradient_checkpointing=False, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, warmup_steps=0,
                     lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1})
    DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok,
               callbacks=[Clock()]).train()
    print("BARE_STEPS_PER_S", (steps - warmup) / (marks[steps] - marks[warmup]))
''')


def run_child(cmd: list[str]) -> tuple[str, float]:
    """(stdout, this child's own peak RSS in MB): os.wait4 reports the one process waited for."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    out_f, err_f = p.stdout, p.stderr
    out, err = out_f.read(), err_f.read()  # small outputs: reading one then the other does not block
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.stderr.write(err[-4000:])
        raise SystemExit(f"{cmd[:4]} exited {p.returncode}")
    return out, usage.ru_maxrss / 1024


def write_pairs(path: Path, n: int) -> None:
    """Pairs from the standard library's source: prompt = a line, chosen = the next line,
    rejected = a line from elsewhere (the configs/dpo.yaml kind of data, offline)."""
    from _model import _stdlib_text

    lines = [ln for text in _stdlib_text(1_000_000) for ln in text.splitlines() if len(ln.strip()) > 20]
    rng = random.Random(0)
    rows = []
    for i in rng.sample(range(len(lines) - 1), n):
        rej = lines[rng.randrange(len(lines))]
        if rej != lines[i + 1]:
            rows.append({"prompt": lines[i] + "\n", "chosen": lines[i + 1], "rejected": rej})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def config(tmp: Path, name: str, model_dir: Path, pairs: Path, lora: bool) -> Path:
    import yaml

    d = {"run": {"name": name, "dir": str(tmp / name), "seed": 42},
         "data": {"source": "files", "paths": [str(pairs)], "format": "preference", "block_size": BLOCK,
                  "validation_fraction": 0.0, "curate": {"enabled": False}},
         "tokenizer": {"name_or_path": str(model_dir)},
         "model": {"name_or_path": str(model_dir), "lora": {"enabled": lora, "r": 8, "alpha": 16}},
         "train": {"method": "dpo", "beta": BETA, "max_steps": STEPS, "micro_batch_size": BATCH, "lr": LR,
                   "warmup_steps": 0, "eval_every": 100000, "save_every": 100000, "log_every": LOG},
         "export": {"report": False}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def llmctl_run(path: Path, run_dir: Path) -> tuple[float, float]:
    """(optimizer steps/s over steps WARMUP..STEPS from metrics.jsonl, peak RSS MB)."""
    _, rss = run_child([sys.executable, "-m", "llmctl", "train", str(path), "-q", "--force"])
    recs = [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    el = {r["step"]: r["elapsed_s"] for r in recs if "loss" in r}
    return (STEPS - WARMUP) / (el[STEPS] - el[WARMUP]), rss


def bare_run(script: Path, model_dir: Path, data_dir: Path, out_dir: Path) -> tuple[float, float]:
    out, rss = run_child([sys.executable, str(script), str(model_dir), str(data_dir), str(out_dir),
                          *map(str, (STEPS, WARMUP, LOG, BATCH, BLOCK, BETA, LR))])
    sps = float(next(ln.split()[1] for ln in out.splitlines() if ln.startswith("BARE_STEPS_PER_S")))
    return sps, rss


def main() -> None:
    from _model import quickstart_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-pref-"))
    model_dir = quickstart_model(tmp / "model")
    pairs = tmp / "pairs.jsonl"
    write_pairs(pairs, N_PAIRS)
    full, lora = config(tmp, "full", model_dir, pairs, False), config(tmp, "lora", model_dir, pairs, True)
    for c in (full, lora):
        subprocess.run([sys.executable, "-m", "llmctl", "prepare", str(c), "-q"], check=True)
    script = tmp / "bare_dpo.py"
    script.write_text(BARE)
    data_dir = tmp / "full" / "prepare" / "dataset"

    ours, theirs, lora_runs = [], [], []
    for r in range(ROUNDS):  # alternate, and swap which side goes first each round
        sides = [("ours", lambda: llmctl_run(full, tmp / "full")), ("bare", lambda: bare_run(script, model_dir, data_dir, tmp / "bare-out"))]
        for side, fn in (sides if r % 2 == 0 else sides[::-1]):
            (ours if side == "ours" else theirs).append(fn())
        lora_runs.append(llmctl_run(lora, tmp / "lora"))
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    sps_ours, sps_bare, rss_ours, rss_bare = med(ours, 0), med(theirs, 0), med(ours, 1), med(theirs, 1)
    rss_lora = med(lora_runs, 1)

    from transformers import AutoModelForCausalLM

    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    # full DPO holds weights, a frozen reference copy, gradients and AdamW's two moments: 5 x fp32
    state_mb = 5 * 4 * n_params / 2**20
    fixed_mb = rss_lora  # LoRA's weight-sized state is 1 x the weights: the rest is fixed cost
    # LoRA/full <= 0.6 needs (fixed + w) / (fixed + 5 w) <= 0.6, i.e. w >= 0.2 x fixed (w = 4 bytes x params;
    # activations, which both sides share, ignored)
    params_for_target = 0.2 * fixed_mb * 2**20 / 4
    metrics = {"model_params": n_params, "steps_timed": STEPS - WARMUP, "batch": BATCH, "max_length": BLOCK, "beta": BETA,
               "pairs": N_PAIRS, "rounds": ROUNDS,
               "llmctl_dpo_steps_per_s": round(sps_ours, 3), "bare_trl_dpo_steps_per_s": round(sps_bare, 3),
               "llmctl_dpo_peak_rss_mb": round(rss_ours, 1), "bare_trl_dpo_peak_rss_mb": round(rss_bare, 1),
               "lora_dpo_peak_rss_mb": round(rss_lora, 1), "lora_dpo_steps_per_s": round(med(lora_runs, 0), 3),
               "full_dpo_weight_state_mb_est": round(state_mb, 1),
               "params_where_lora_ratio_reaches_0.6_est": int(params_for_target),
               "llmctl_runs": [[round(a, 3), round(b, 1)] for a, b in ours],
               "bare_runs": [[round(a, 3), round(b, 1)] for a, b in theirs],
               "lora_runs": [[round(a, 3), round(b, 1)] for a, b in lora_runs],
               "machine": {**machine(), "load_avg_1_5_15m": [round(x, 2) for x in os.getloadavg()]}}
    write_result("preference", metrics, {
        "dpo steps/s llmctl vs bare TRL": ratio(sps_ours / sps_bare, 0.95),
        "dpo peak RSS llmctl vs bare TRL": ratio(rss_ours / rss_bare, None),
        "lora-dpo vs full dpo peak RSS (1.3M model)": ratio(rss_lora / rss_ours, 0.6, higher_is_better=False),
    })


if __name__ == "__main__":
    main()
