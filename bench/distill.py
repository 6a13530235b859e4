"""`llmctl distill` on the quickstart corpus: does the teacher help a student half its depth?

A teacher trained as the quickstart (configs/quickstart.yaml); students with half its layers,
all on the teacher's prepared data (same split, same tokenizer), equal steps and batches:
  - random init + KD                                 vs  random init, CE only   (SEEDS seeds)
  - pruned init (ShortGPT block influence) + KD      vs  random init + KD, and pruned init
    CE only (the first PRUNED seeds: "pruned_seeds" in SIZES)
Reported: validation perplexities (the same fixed validation rows for every model), the share
of the CE-student -> teacher gap that KD closes, the teacher's cost in training tokens/s, and
the student's generation speed-up over the teacher. Target: KD below CE-only on every seed.
(Measured at the quickstart size: from the teacher's own pruned weights, 500 more steps of
plain CE already reach the teacher, which is far from converged after 1,500 steps, so pulling
towards it cannot help there; the KD-vs-CE target is posed on the random-init student.)

Every run goes through the real CLI (`llmctl prepare|train|distill --json`). Sizes:
  python bench/distill.py [full|small|tiny]   (or LLMCTL_BENCH_SIZE=...; default full)
full = the quickstart as shipped (about an hour on 2 free CPU cores; LLMCTL_BENCH_TEACHER_RUN=DIR
reuses a finished quickstart run as the teacher when its config matches); small and tiny shrink
corpus and steps (tiny also the model: hidden 64, blocks of 64, vocab 1024) for a loaded or
slow machine, and say so in the result.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from common import HERE, machine, ratio, write_result

REPO = HERE.parent
SIZES = {
    # corpus bytes, teacher/student steps, eval batches (x batch rows), seeds, seeds with pruned-init students;
    # "model" overrides the quickstart's model and data sizes (full: none, the quickstart as shipped)
    "full": {"max_bytes": 8_000_000, "teacher_steps": 1500, "student_steps": 500, "eval_batches": 10, "batch": 16, "seeds": 3, "pruned_seeds": 1, "model": {}},
    "small": {"max_bytes": 2_000_000, "teacher_steps": 400, "student_steps": 120, "eval_batches": 8, "batch": 16, "seeds": 3, "pruned_seeds": 3, "model": {}},
    "tiny": {"max_bytes": 400_000, "teacher_steps": 150, "student_steps": 20, "eval_batches": 8, "batch": 8, "seeds": 3, "pruned_seeds": 1,
             "model": {"hidden_size": 64, "context_length": 128, "block_size": 64, "vocab_size": 1024}},
}
ALPHA, TEMPERATURE = 0.5, 2.0
GEN_PROMPTS = ["def read_config(path):", "import os", "class Parser:", "for i in range(10):"]
GEN_NEW = 48


def llmctl(*args: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "llmctl", *args, "--json"], cwd=REPO, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-3000:])
        raise SystemExit(f"llmctl {' '.join(args)} failed with exit {r.returncode}")
    return json.loads(r.stdout)


def teacher_config(work: Path, size: dict) -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    cfg["run"]["dir"] = str(work / "teacher")
    cfg["data"]["max_bytes"] = size["max_bytes"]
    m = dict(size["model"])
    if "block_size" in m:
        cfg["data"]["block_size"] = m.pop("block_size")
    if "vocab_size" in m:
        cfg["tokenizer"]["vocab_size"] = m.pop("vocab_size")
    cfg["model"].update(m)
    t = cfg["train"]
    t.update(max_steps=size["teacher_steps"], micro_batch_size=size["batch"], eval_batches=size["eval_batches"], max_time=None,
             eval_every=size["teacher_steps"], save_every=size["teacher_steps"], warmup_steps=min(t["warmup_steps"], size["teacher_steps"] // 10))
    for k in ("eval", "generate", "export"):
        cfg.pop(k, None)
    return cfg


def student_config(teacher: dict, work: Path, name: str, size: dict, seed: int, *, init: str, alpha: float) -> dict:
    cfg = json.loads(json.dumps(teacher))
    half = teacher["model"]["n_layers"] // 2
    cfg["run"]["dir"] = str(work / name)  # run.seed stays: the same split as the teacher
    cfg["model"]["n_layers"] = half  # random init: the same shape as the pruned student
    steps = size["student_steps"]
    cfg["train"].update(max_steps=steps, seed=seed, eval_every=steps, save_every=steps, warmup_steps=max(1, steps // 10))
    d = {"teacher": str(work / "teacher"), "alpha": alpha, "temperature": TEMPERATURE}
    if init == "prune":
        d.update(student_init="prune", keep_layers=half)
    cfg["distill"] = d
    return cfg


def run_student(teacher_cfg: dict, work: Path, name: str, size: dict, seed: int, init: str, alpha: float) -> dict:
    cfg = student_config(teacher_cfg, work, name, size, seed, init=init, alpha=alpha)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # The teacher's prepared data: same data, tokenizer and seed, so prepare is up to date here too.
    shutil.copytree(work / "teacher" / "prepare", work / name / "prepare", dirs_exist_ok=True)
    res = llmctl("distill", str(path))
    print(f"[distill] {name}: val_ppl {res['val_ppl']}  tokens/s {res['tokens_per_s']}  ({res['seconds']} s)", flush=True)
    return res


def gen_tokens_per_s(model_dir: Path) -> float:
    import torch

    from llmctl.generation import Sampling, generate_batch
    from llmctl.modeling import load_for_inference

    torch.manual_seed(0)
    model, tok = load_for_inference(str(model_dir))
    model.generation_config.eos_token_id = None  # always GEN_NEW tokens: equal work for both
    sp = Sampling(max_new_tokens=GEN_NEW, do_sample=False)
    generate_batch(model, tok, GEN_PROMPTS[:1], sp)  # warm-up
    best = 0.0
    for _ in range(3):  # best of 3: noise on a shared machine only slows down
        t0 = time.perf_counter()
        n = sum(r["completion_tokens"] for p in GEN_PROMPTS for r in generate_batch(model, tok, [p], sp))
        best = max(best, n / (time.perf_counter() - t0))
    return best


def gap_closed(ce_ppl: float, kd_ppl: float, teacher_ppl: float) -> float | None:
    """Share of the CE-student -> teacher perplexity gap that KD closes; None when there is no
    gap to close (a teacher no better than the CE-only student)."""
    if teacher_ppl >= ce_ppl:
        return None
    return (ce_ppl - kd_ppl) / (ce_ppl - teacher_ppl)


def main() -> None:
    name = (sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LLMCTL_BENCH_SIZE", "full")).lower()
    if name not in SIZES:
        raise SystemExit(f"size {name!r}: expected one of {', '.join(SIZES)}")
    size = SIZES[name]
    work = Path(os.environ.get("LLMCTL_BENCH_WORK") or tempfile.mkdtemp(prefix="bench-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    at_start = machine()

    tcfg = teacher_config(work, size)
    (work / "teacher.yaml").write_text(yaml.safe_dump(tcfg, sort_keys=False))
    reuse = os.environ.get("LLMCTL_BENCH_TEACHER_RUN")
    if reuse and name == "full":
        # A finished quickstart run (e.g. bench/quickstart.py's) is this teacher: same data,
        # tokenizer, model and steps. Its prepare and train are copied, then checked up to date.
        for stage in ("prepare", "train"):
            shutil.copytree(Path(reuse) / stage, work / "teacher" / stage, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoints"))
    llmctl("prepare", str(work / "teacher.yaml"))
    teacher = llmctl("train", str(work / "teacher.yaml"))
    print(f"[distill] teacher: {tcfg['model']['n_layers']} layers, val_ppl {teacher['val_ppl']}, tokens/s {teacher['tokens_per_s']}", flush=True)

    def one_seed(i: int) -> dict:
        # KD vs CE-only on the same random-init student (every seed): what the teacher adds.
        # Pruned init (the teacher's own layers; KD and CE-only) on the first PRUNED_SEEDS seeds.
        seed = 1000 + i
        kd = run_student(tcfg, work, f"random-kd-{seed}", size, seed, "model", ALPHA)
        ce = run_student(tcfg, work, f"random-ce-{seed}", size, seed, "model", 0.0)
        pk = run_student(tcfg, work, f"kd-{seed}", size, seed, "prune", ALPHA) if i < size["pruned_seeds"] else {}
        pc = run_student(tcfg, work, f"ce-{seed}", size, seed, "prune", 0.0) if i < size["pruned_seeds"] else {}
        return {"seed": seed, "kd_ppl": kd["val_ppl"], "ce_ppl": ce["val_ppl"], "pruned_kd_ppl": pk.get("val_ppl"),
                "pruned_ce_ppl": pc.get("val_ppl"), "kd_tokens_per_s": kd["tokens_per_s"], "ce_tokens_per_s": ce["tokens_per_s"],
                "pruned_layers": pk.get("pruned_layers")}

    # LLMCTL_BENCH_JOBS=N runs N seeds at once (a busy shared machine); tokens/s then shares the CPU.
    jobs = int(os.environ.get("LLMCTL_BENCH_JOBS", "1"))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = list(pool.map(one_seed, range(size["seeds"])))

    t_ppl = teacher["val_ppl"]
    gaps = [g for r in rows if (g := gap_closed(r["ce_ppl"], r["kd_ppl"], t_ppl)) is not None]
    overhead = statistics.median(1 - r["kd_tokens_per_s"] / r["ce_tokens_per_s"] for r in rows)
    t_gen = gen_tokens_per_s(work / "teacher" / "train" / "model")
    s_gen = gen_tokens_per_s(work / f"random-kd-{rows[0]['seed']}" / "train" / "model")
    metrics = {
        "size": name,
        "size_settings": size,
        "note": "reduced size" if name != "full" else "quickstart size",
        "teacher_layers": tcfg["model"]["n_layers"],
        "student_layers": tcfg["model"]["n_layers"] // 2,
        "teacher_steps": teacher["steps"],
        "student_steps": size["student_steps"],
        "alpha": ALPHA,
        "temperature": TEMPERATURE,
        "teacher_val_ppl": t_ppl,
        "seeds": rows,
        "kd_ppl_mean": round(statistics.mean(r["kd_ppl"] for r in rows), 3),
        "ce_ppl_mean": round(statistics.mean(r["ce_ppl"] for r in rows), 3),
        "pruned_kd_ppl_mean": round(statistics.mean(r["pruned_kd_ppl"] for r in rows if r["pruned_kd_ppl"] is not None), 3),
        "gap_closed_by_kd_mean": round(statistics.mean(gaps), 4) if gaps else None,
        "teacher_overhead_tokens_per_s": round(overhead, 4),
        "teacher_gen_tokens_per_s": round(t_gen, 1),
        "student_gen_tokens_per_s": round(s_gen, 1),
        "wall_seconds": round(time.time() - t_start, 1),
        "parallel_seeds": jobs,
        "machine": at_start,
        "work_dir": str(work),
    }
    ratios = {
        "ce_ppl / kd_ppl, worst seed": ratio(min(r["ce_ppl"] / r["kd_ppl"] for r in rows), 1.0),
        "random-init KD ppl / pruned-init KD ppl, worst": ratio(min(r["kd_ppl"] / r["pruned_kd_ppl"] for r in rows if r["pruned_kd_ppl"] is not None), 1.0),
        "student / teacher generation speed": ratio(s_gen / t_gen, 1.3),
    }
    student = json.loads((work / f"random-kd-{rows[0]['seed']}" / "train" / "manifest.json").read_text()).get("headline", {}).get("parameters")
    write_result("distill", metrics, ratios, model_params={"teacher": teacher.get("parameters"), "student": student})
    if not os.environ.get("LLMCTL_BENCH_WORK"):
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
