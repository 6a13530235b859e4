"""Image-text models: the vision quickstart's figures, and `llmctl train` vs a bare Trainer.

    python bench/vision.py                 # the steps/s comparison, then the vision quickstart (minutes)
    python bench/vision.py --from-run DIR  # the comparison, and a finished quickstart run's figures
    python bench/vision.py --keep-quickstart  # the comparison only; the quickstart's figures kept from results.json

1. `make demo-vision` (configs/vision-quickstart.yaml) from scratch, timed: exact match and BLEU
   on both held-out splits against the most frequent training caption and the untrained model,
   and a generated caption for the README.
2. Training steps/s, `llmctl train` (data.format=image_text) vs a bare transformers Trainer.

Same model (the vision quickstart's LLaVA: CLIP tower 32 px / patch 4, projector, a 2-layer
64-wide llama; its initial weights saved once and loaded by both sides), same prepared rows
(RUN/prepare/dataset of the builtin shapes: input_ids, answer-only labels, pixel_values),
batch, lr, schedule, AdamW settings, seed and steps. Each side runs in a fresh subprocess; the
two alternate ROUNDS times (each goes first equally often) and medians are kept. Both time
optimizer steps WARMUP..STEPS: llmctl from metrics.jsonl's `elapsed_s`, the bare script from a
callback at the same steps. llmctl's side also runs its checkpoint/eval/metrics machinery as
configured (eval and saves pushed past STEPS, as the bare side does none).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from common import machine, ratio, write_result

STEPS, WARMUP, LOG, BATCH, LR, ROUNDS, IMAGES = 100, 10, 5, 32, 2e-3, 3, 600
HERE = Path(__file__).resolve().parent
REPO = HERE.parent

BARE = textwrap.dedent('''
    import sys, time
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForImageTextToText, Trainer, TrainerCallback, TrainingArguments

    model_dir, data_dir, out_dir, steps, warmup, log, batch, lr, pad = sys.argv[1:10]
    steps, warmup, log, batch, lr, pad = int(steps), int(warmup), int(log), int(batch), float(lr), int(pad)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    ds = load_from_disk(data_dir)["train"].with_format("torch")

    def collate(rows):
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), pad); labels = torch.full((len(rows), n), -100); mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"]); ids[i, :k] = r["input_ids"]; labels[i, :k] = r["labels"]; mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": torch.stack([r["pixel_values"] for r in rows])}

    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (warmup, steps):
                marks[state.global_step] = time.perf_counter()

    args = TrainingArguments(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                             logging_steps=log, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
                             disable_tqdm=True, remove_unused_columns=False, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95,
                             max_grad_norm=1.0, warmup_steps=0, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1})
    Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[Clock()]).train()
    print("BARE_STEPS_PER_S", (steps - warmup) / (marks[steps] - marks[warmup]))
''')


def config(tmp: Path) -> Path:
    import yaml

    d = yaml.safe_load((REPO / "configs" / "vision-quickstart.yaml").read_text())
    d["run"] = {"name": "bench-vision", "dir": str(tmp / "run"), "seed": 0}
    d["data"]["image"]["builtin_images"] = IMAGES
    d["train"].update({"max_steps": STEPS, "max_time": None, "micro_batch_size": BATCH, "lr": LR, "warmup_steps": 0,
                       "eval_every": 100000, "save_every": 100000, "log_every": LOG})
    path = tmp / "vision.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def run(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"{cmd[:4]} exited {p.returncode}")
    return p.stdout


def llmctl_side(path: Path, run_dir: Path) -> float:
    run([sys.executable, "-m", "llmctl", "train", str(path), "-q", "--force"])
    recs = [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    el = {r["step"]: r["elapsed_s"] for r in recs if "loss" in r}
    return (STEPS - WARMUP) / (el[STEPS] - el[WARMUP])


def quickstart(run_dir: Path | None) -> dict:
    """The vision quickstart's figures: a fresh run (wall clock), or a finished one (its stages' durations)."""
    import time

    from llmctl.rundir import RunDir

    how = "the stages' durations, summed"
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="bench-vision-qs-")) / "run"
        t0 = time.perf_counter()
        run([sys.executable, "-m", "llmctl", "run", str(REPO / "configs" / "vision-quickstart.yaml"), "--run-dir", str(run_dir), "-q"])
        wall, how = time.perf_counter() - t0, "wall clock"
    rd = RunDir(run_dir)
    man = {s: rd.manifest(s) or {} for s in ("prepare", "train", "eval", "export")}
    res = json.loads(rd.results_path.read_text())
    seconds = wall if how == "wall clock" else sum(m.get("seconds") or 0 for m in man.values())
    splits = {res["split"]: {**res["generation"], **res["baselines"]}, **{k: {**v["generation"], **v["baselines"]} for k, v in res.get("other_splits", {}).items()}}
    keep = ("exact_match", "bleu", "chrf", "examples", "baseline_majority_exact_match", "baseline_majority_bleu")
    preds = [json.loads(x) for x in (rd.predictions_file("eval")).read_text().splitlines()]
    i = next((k for k, p in enumerate(preds) if p["exact_match"]), 0)
    sample = preds[i]
    from datasets import load_from_disk
    from PIL import Image

    from llmctl.vision.infer import open_image

    # The README's picture: that held-out image, scaled up (nearest) so its 32 pixels can be seen.
    img = open_image(load_from_disk(str(rd.pairs_dir))[res["split"]][i]["image"])
    img.resize((img.width * 4, img.height * 4), Image.NEAREST).save(REPO / "docs" / "vision-sample.png")
    return {"seconds": round(seconds, 1), "seconds_measured_as": how, "images": man["prepare"]["headline"].get("images"),
            "parameters": man["train"]["headline"].get("parameters"), "steps": man["train"]["headline"].get("steps"),
            "train_seconds": man["train"]["headline"].get("seconds"), "perplexity": res["perplexity"]["perplexity"],
            "init": res.get("init"), "majority_caption": res["majority_caption"]["caption"],
            "splits": {k: {x: v.get(x) for x in keep} for k, v in splits.items()}, "sample": sample}


def main() -> None:
    sys.path.insert(0, str(REPO))
    from llmctl.config import load_config
    from llmctl.vision.infer import load_processor
    from llmctl.vision.model import build

    tmp = Path(tempfile.mkdtemp(prefix="bench-vision-"))
    path = config(tmp)
    run([sys.executable, "-m", "llmctl", "prepare", str(path), "-q"])
    cfg = load_config(path)
    proc = load_processor(tmp / "run" / "prepare" / "tokenizer")
    model = build(cfg, proc.tokenizer)  # the seeded initialisation llmctl train starts from
    model.save_pretrained(tmp / "init")
    n_params = sum(p.numel() for p in model.parameters())
    script = tmp / "bare.py"
    script.write_text(BARE)
    bare_cmd = [sys.executable, str(script), str(tmp / "init"), str(tmp / "run" / "prepare" / "dataset"), str(tmp / "bare-out"),
                *map(str, (STEPS, WARMUP, LOG, BATCH, LR, proc.tokenizer.pad_token_id))]
    ours, theirs = [], []
    for r in range(ROUNDS):
        sides = [("ours", lambda: llmctl_side(path, tmp / "run")),
                 ("bare", lambda: float(next(ln.split()[1] for ln in run(bare_cmd).splitlines() if ln.startswith("BARE_STEPS_PER_S"))))]
        for side, fn in (sides if r % 2 == 0 else sides[::-1]):
            (ours if side == "ours" else theirs).append(fn())
    a, b = statistics.median(ours), statistics.median(theirs)
    if sys.argv[1:2] == ["--keep-quickstart"]:  # the comparison only; the quickstart's figures as results.json has them
        kept = json.loads((HERE / "results.json").read_text())["vision"]["metrics"]
        qs = {"machine": kept["machine"], **kept["quickstart"]}  # the machine it was measured on
    else:
        qs = {**quickstart(Path(sys.argv[2]) if sys.argv[1:2] == ["--from-run"] else None), "machine": machine()}
    metrics = {"model_params": n_params, "images": IMAGES, "image_size": cfg.model.vision.image_size, "patch_size": cfg.model.vision.patch_size,
               "steps_timed": STEPS - WARMUP, "batch": BATCH, "rounds": ROUNDS,
               "llmctl_image_text_steps_per_s": round(a, 3), "bare_trainer_steps_per_s": round(b, 3),
               "llmctl_runs": [round(x, 3) for x in ours], "bare_runs": [round(x, 3) for x in theirs],
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "machine": {**machine(), "load_avg_1_5_15m": [round(x, 2) for x in os.getloadavg()]}, "quickstart": qs}
    val = qs["splits"].get("validation", {})
    em, base = val.get("exact_match") or 0.0, val.get("baseline_majority_exact_match") or 0.0
    write_result("vision", metrics, {"image-text train steps/s llmctl vs bare Trainer": ratio(a / b, 0.9),
                                     "vision quickstart exact match vs majority caption (validation)": ratio(em / base if base else float(em > 0) * 99, 3.0),
                                     "vision quickstart minutes (lower is better)": ratio(qs["seconds"] / 60, 10.0, higher_is_better=False)})


if __name__ == "__main__":
    main()
