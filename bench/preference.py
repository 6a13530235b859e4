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
3. The same LoRA-DPO vs full-DPO peak RSS at a size where the target can be met: a random-init
   llama of BIG (~79M parameters: 12 x 768, GQA 12/4, the quickstart tokenizer's 4096 tokens)
   saved with save_pretrained, BIG_STEPS steps of batch BIG_BATCH, max length BIG_BLOCK.
4. The demo (configs/dpo.yaml on top of the quickstart model) on SEEDS run seeds: held-out
   preference accuracy and likelihood accuracy (the model alone prefers chosen), before (the
   quickstart model, eval.compare_init) and after, mean and spread (population stdev), and BLEU
   on the held-out chosen continuations before and after. The quickstart model is
   runs/quickstart/train/model when `llmctl run configs/quickstart.yaml` made it, else trained here first.

5. The safety demo (configs/orpo-safety.yaml, ORPO on top of the quickstart model): the red-team eval
   (llmctl/data/redteam.jsonl's 40 prompts, none among the training pairs) before and after:
   refusal and flagged-output rates with the rails off (and on), per category.

Every row records its model's parameter count (`*_model_params`).
    python bench/preference.py [--parts speed,memory,demo,safety]   (default: all)
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
BIG = {"hidden": 768, "layers": 12, "heads": 12, "kv_heads": 4, "intermediate": 2048}
BIG_STEPS, BIG_BATCH, BIG_BLOCK = 3, 4, 64
SEEDS = (42, 43, 44)
PARTS = ("speed", "memory", "demo", "safety")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent

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


def config(tmp: Path, name: str, model_dir: Path, pairs: Path, lora: bool, steps: int = STEPS, batch: int = BATCH,
           block: int = BLOCK) -> Path:
    import yaml

    d = {"run": {"name": name, "dir": str(tmp / name), "seed": 42},
         "data": {"source": "files", "paths": [str(pairs)], "format": "preference", "block_size": block,
                  "validation_fraction": 0.0, "curate": {"enabled": False}},
         "tokenizer": {"name_or_path": str(model_dir)},
         "model": {"name_or_path": str(model_dir), "lora": {"enabled": lora, "r": 8, "alpha": 16}},
         "train": {"method": "dpo", "beta": BETA, "max_steps": steps, "micro_batch_size": batch, "lr": LR,
                   "warmup_steps": 0, "eval_every": 100000, "save_every": 100000, "log_every": LOG if steps > LOG else 1},
         "export": {"report": False}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def llmctl_run(path: Path, run_dir: Path, steps: int = STEPS, warmup: int = WARMUP) -> tuple[float, float]:
    """(optimizer steps/s over steps warmup..steps from metrics.jsonl, peak RSS MB)."""
    _, rss = run_child([sys.executable, "-m", "llmctl", "train", str(path), "-q", "--force"])
    recs = [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    el = {r["step"]: r["elapsed_s"] for r in recs if "loss" in r}
    return (steps - warmup) / (el[steps] - el[warmup]), rss


def bare_run(script: Path, model_dir: Path, data_dir: Path, out_dir: Path) -> tuple[float, float]:
    out, rss = run_child([sys.executable, str(script), str(model_dir), str(data_dir), str(out_dir),
                          *map(str, (STEPS, WARMUP, LOG, BATCH, BLOCK, BETA, LR))])
    sps = float(next(ln.split()[1] for ln in out.splitlines() if ln.startswith("BARE_STEPS_PER_S")))
    return sps, rss


def n_params(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


def speed(tmp: Path, model_dir: Path, pairs: Path) -> tuple[dict, dict]:
    """Part 1 and 2: llmctl vs bare TRL DPO, and LoRA vs full at the quickstart's size."""
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

    params = n_params(model_dir)
    # full DPO holds weights, a frozen reference copy, gradients and AdamW's two moments: 5 x fp32
    state_mb = 5 * 4 * params / 2**20
    fixed_mb = rss_lora  # LoRA's weight-sized state is 1 x the weights: the rest is fixed cost
    # LoRA/full <= 0.6 needs (fixed + w) / (fixed + 5 w) <= 0.6, i.e. w >= 0.2 x fixed (w = 4 bytes x params;
    # activations, which both sides share, ignored)
    params_for_target = 0.2 * fixed_mb * 2**20 / 4
    metrics = {"model_params": params, "steps_timed": STEPS - WARMUP, "batch": BATCH, "max_length": BLOCK, "beta": BETA,
               "pairs": N_PAIRS, "rounds": ROUNDS,
               "llmctl_dpo_steps_per_s": round(sps_ours, 3), "bare_trl_dpo_steps_per_s": round(sps_bare, 3),
               "llmctl_dpo_peak_rss_mb": round(rss_ours, 1), "bare_trl_dpo_peak_rss_mb": round(rss_bare, 1),
               "lora_dpo_peak_rss_mb": round(rss_lora, 1), "lora_dpo_steps_per_s": round(med(lora_runs, 0), 3),
               "full_dpo_weight_state_mb_est": round(state_mb, 1),
               "params_where_lora_ratio_reaches_0.6_est": int(params_for_target),
               "llmctl_runs": [[round(a, 3), round(b, 1)] for a, b in ours],
               "bare_runs": [[round(a, 3), round(b, 1)] for a, b in theirs],
               "lora_runs": [[round(a, 3), round(b, 1)] for a, b in lora_runs]}
    return metrics, {
        "dpo steps/s llmctl vs bare TRL": ratio(sps_ours / sps_bare, 0.95),
        "dpo peak RSS llmctl vs bare TRL": ratio(rss_ours / rss_bare, None),
        f"lora-dpo vs full dpo peak RSS ({params / 1e6:.1f}M model)": ratio(rss_lora / rss_ours, 0.6, higher_is_better=False),
    }


def big_model(out: Path, tok_dir: Path) -> Path:
    """A random-init llama of BIG's shape with the quickstart tokenizer, saved with save_pretrained."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=BIG["hidden"], intermediate_size=BIG["intermediate"],
                      num_hidden_layers=BIG["layers"], num_attention_heads=BIG["heads"], num_key_value_heads=BIG["kv_heads"],
                      max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def memory(tmp: Path, model_dir: Path, pairs: Path) -> tuple[dict, dict]:
    """Part 3: LoRA-DPO vs full DPO peak RSS on the ~79M model (few steps, short pairs)."""
    big = big_model(tmp / "big-model", model_dir)
    params = n_params(big)
    full = config(tmp, "big-full", big, pairs, False, steps=BIG_STEPS, batch=BIG_BATCH, block=BIG_BLOCK)
    lora = config(tmp, "big-lora", big, pairs, True, steps=BIG_STEPS, batch=BIG_BATCH, block=BIG_BLOCK)
    for c in (full, lora):
        subprocess.run([sys.executable, "-m", "llmctl", "prepare", str(c), "-q"], check=True)
    sps_full, rss_full = llmctl_run(full, tmp / "big-full", BIG_STEPS, 1)
    sps_lora, rss_lora = llmctl_run(lora, tmp / "big-lora", BIG_STEPS, 1)
    metrics = {"big_model_params": params, "big_steps": BIG_STEPS, "big_batch": BIG_BATCH, "big_max_length": BIG_BLOCK,
               "big_full_dpo_peak_rss_mb": round(rss_full, 1), "big_lora_dpo_peak_rss_mb": round(rss_lora, 1),
               "big_full_dpo_steps_per_s": round(sps_full, 3), "big_lora_dpo_steps_per_s": round(sps_lora, 3),
               "big_full_dpo_weight_state_mb_est": round(5 * 4 * params / 2**20, 1)}
    return metrics, {f"lora-dpo vs full dpo peak RSS ({params / 1e6:.0f}M model)": ratio(rss_lora / rss_full, 0.6, higher_is_better=False)}


def quickstart_sft(tmp: Path) -> Path:
    """The quickstart's trained model: runs/quickstart's, else trained here (11 minutes on 2 cores)."""
    mine = REPO / "runs" / "quickstart" / "train" / "model"
    if (mine / "config.json").is_file():
        return mine
    qs = REPO / "configs" / "quickstart.yaml"
    for stage in ("prepare", "train"):
        subprocess.run([sys.executable, "-m", "llmctl", stage, str(qs), "-q", "--run-dir", str(tmp / "quickstart")], check=True, cwd=REPO)
    return tmp / "quickstart" / "train" / "model"


def sft_record(sft: Path) -> dict:
    """How the starting model was trained (its run's train manifest): steps, time, budget, val loss."""
    m = json.loads((sft.parent / "manifest.json").read_text()) if (sft.parent / "manifest.json").is_file() else {}
    h = m.get("headline") or {}
    return {"path": str(sft), "steps": h.get("steps"), "seconds": h.get("seconds"), "val_ppl": h.get("val_ppl"),
            "max_time": (m.get("config_values") or {}).get("train.max_time")}


def demo(tmp: Path) -> tuple[dict, dict]:
    """Part 4: configs/dpo.yaml on top of the quickstart model, SEEDS run seeds, before and after."""
    sft = quickstart_sft(tmp)
    cfg = REPO / "configs" / "dpo.yaml"
    keys = ("preference_accuracy", "likelihood_accuracy", "reward_margin", "bleu")
    rows = []
    for seed in SEEDS:
        run = tmp / f"dpo-seed{seed}"
        sets = ["--run-dir", str(run), "--set", f"run.seed={seed}", "--set", f"model.name_or_path={sft}",
                "--set", f"tokenizer.name_or_path={sft}", "--set", "eval.thresholds.preference_accuracy_min=null"]  # measured, not gated
        for stage in ("prepare", "train", "eval"):
            subprocess.run([sys.executable, "-m", "llmctl", stage, str(cfg), "-q", *sets], check=True, cwd=REPO)
        res = json.loads((run / "eval" / "results.json").read_text())
        pref, init, gen = res["preference"], res["init"], res.get("generation") or {}
        after = {**{k: pref[k] for k in keys[:3]}, "bleu": gen.get("bleu")}
        head = json.loads((run / "train" / "manifest.json").read_text())["headline"]
        rows.append({"seed": seed, "pairs": pref["pairs"], "after": after, "before": {k: init.get(k) for k in keys},
                     "dpo_steps": head.get("steps"), "stopped_by": head.get("stopped_by")})
    params = n_params(sft)

    def spread(side: str, k: str) -> dict:
        xs = [r[side][k] for r in rows if r[side].get(k) is not None]
        return {"mean": round(statistics.fmean(xs), 4), "stdev": round(statistics.pstdev(xs), 4)} if xs else {}

    metrics = {"demo_model_params": params, "demo_seeds": list(SEEDS), "demo_runs": rows, "demo_sft": sft_record(sft),
               **{f"demo_{side}_{k}": spread(side, k) for side in ("before", "after") for k in keys}}
    acc = metrics["demo_after_preference_accuracy"]["mean"]
    return metrics, {"demo held-out preference accuracy after DPO (3 seeds, mean)": ratio(acc, 0.5)}


def _eval_json(args: list[str]) -> dict:
    """`llmctl eval ... --json`'s result, then its results.json."""
    out = subprocess.run([sys.executable, "-m", "llmctl", "eval", *args, "--json"], check=True, cwd=REPO, capture_output=True, text=True).stdout
    return json.loads(Path(json.loads(out)["results"]).read_text())


def safety(tmp: Path) -> tuple[dict, dict]:
    """Part 5: configs/orpo-safety.yaml. The red-team eval (the 40 shipped prompts, none among the
    training pairs) on the quickstart model (before) and on the ORPO-tuned one (after)."""
    sft = quickstart_sft(tmp)
    cfg = str(REPO / "configs" / "orpo-safety.yaml")
    run = tmp / "orpo-safety"
    sets = ["--run-dir", str(run), "--set", f"model.name_or_path={sft}", "--set", f"tokenizer.name_or_path={sft}"]
    subprocess.run([sys.executable, "-m", "llmctl", "prepare", cfg, "-q", *sets], check=True, cwd=REPO)
    before = _eval_json([cfg, "-q", *sets, "--model", str(sft), "--set", "eval.compare_init=false"])
    subprocess.run([sys.executable, "-m", "llmctl", "train", cfg, "-q", *sets], check=True, cwd=REPO)
    after = _eval_json([cfg, "-q", *sets])
    rows = [json.loads(x) for x in (run / "eval" / "redteam.jsonl").read_text().splitlines()]

    def side(res: dict) -> dict:
        s, p = res["safety"], res["preference"]
        return {"refused_rate_off": s["off"]["refused_rate"], "flagged_rate_off": s["off"]["flagged_rate"],
                "flagged_rate_on": s["on"]["flagged_rate"], "refused_rate_on": s["on"]["refused_rate"],
                "likelihood_accuracy": p["likelihood_accuracy"]}

    b, a = side(before), side(after)
    a["preference_accuracy"], a["reward_margin"] = after["preference"]["preference_accuracy"], after["preference"]["reward_margin"]
    by_cat: dict[str, list[int]] = {}
    sys.path.insert(0, str(REPO))
    from llmctl.safety import is_refusal

    for r in rows:  # after: refusals with the rails off, per red-team category
        by_cat.setdefault(r["category"], [0, 0])
        by_cat[r["category"]][0] += is_refusal(r["output_off"])
        by_cat[r["category"]][1] += 1
    head = json.loads((run / "train" / "manifest.json").read_text())["headline"]
    metrics = {"safety_model_params": n_params(sft), "safety_sft": sft_record(sft),
               "safety_steps": head.get("steps"), "safety_method": "orpo", "safety_stopped_by": head.get("stopped_by"), "safety_prompts": after["safety"]["prompts"],
               "safety_pairs_heldout": after["preference"]["pairs"], "safety_before": b, "safety_after": a,
               "safety_after_refused_by_category": {k: f"{v[0]}/{v[1]}" for k, v in sorted(by_cat.items())},
               "safety_example_after": {k: rows[0][k] for k in ("id", "prompt", "output_off")}}
    return metrics, {"safety demo: red-team refusal rate, rails off, after ORPO": ratio(a["refused_rate_off"], None),
                     "safety demo: red-team refusal rate, rails off, before": ratio(b["refused_rate_off"], None)}


def main() -> None:
    import argparse

    from _model import quickstart_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    parts = ap.parse_args().parts.split(",")
    if set(parts) - set(PARTS):
        raise SystemExit(f"--parts: {', '.join(sorted(set(parts) - set(PARTS)))}: expected some of {', '.join(PARTS)}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-pref-"))
    model_dir, pairs = tmp / "model", tmp / "pairs.jsonl"
    if {"speed", "memory"} & set(parts):  # the demo parts bring their own model and data
        quickstart_model(model_dir)
        write_pairs(pairs, N_PAIRS)
    metrics, ratios = {}, {}
    for name, fn in (("speed", lambda: speed(tmp, model_dir, pairs)), ("memory", lambda: memory(tmp, model_dir, pairs)),
                     ("demo", lambda: demo(tmp)), ("safety", lambda: safety(tmp))):
        if name in parts:
            load = [round(x, 2) for x in os.getloadavg()]
            m, r = fn()
            metrics.update(m)
            ratios.update(r)
            metrics.setdefault("ratio_parts", {}).update({k: name for k in r})  # which part (and load) each ratio is from
            # each part's machine and load, start and end: the parts may run hours apart
            metrics[f"machine_{name}"] = {**machine(), "load_avg_1_5_15m_start": load, "load_avg_1_5_15m_end": [round(x, 2) for x in os.getloadavg()]}
    metrics["machine"] = {**machine(), "load_avg_1_5_15m": [round(x, 2) for x in os.getloadavg()]}
    # A subset of the parts keeps the other parts' numbers from the last run (bench/results/preference.json),
    # read now: parts run side by side in separate processes keep each other's
    last = HERE / "results" / "preference.json"
    if last.is_file() and set(parts) != set(PARTS):
        old = json.loads(last.read_text())
        parts_of = {**old.get("metrics", {}).get("ratio_parts", {}), **metrics.get("ratio_parts", {})}
        metrics, ratios = {**old.get("metrics", {}), **metrics, "ratio_parts": parts_of}, {**old.get("ratios", {}), **ratios}
    write_result("preference", metrics, ratios)


if __name__ == "__main__":
    main()
