"""Perplexity throughput: `llmctl eval --set eval.text_paths=[...]` vs lm-evaluation-harness's
`loglikelihood_rolling` on the same model, files, window and batch size. Benchmark tasks:
`llmctl eval --set eval.tasks=[local.yaml]` vs `lm_eval --model hf` on the same model and a
local multiple-choice task (accuracy must be equal; tokens/s of the whole command).

Both sides are fresh processes timed from outside (spawn to exit: imports, model load,
tokenizing, scoring); they alternate and each keeps its best of ROUNDS. The summed
log-likelihoods must agree (same number), and the tokens/s ratio says how fast.

    python bench/eval.py               # toy model (random 4 x 128): ~2 min; bench/results/eval.json
    python bench/eval.py --size 85m    # the trained 85M bench model, 40 KB of text, 2 rounds: ~10 min; eval-85m.json
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

from _model import quickstart_model
from common import machine, ratio, write_result

MAX_BYTES = int(os.environ.get("BENCH_EVAL_BYTES", 300_000))
WINDOW = 512
BATCH = 16
ROUNDS = int(os.environ.get("BENCH_EVAL_ROUNDS", 3))

LM_EVAL = r'''
import json, sys
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
model, window, batch, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
lm = HFLM(pretrained=model, backend="causal", dtype="float32", max_length=window, batch_size=batch, device="cpu", add_bos_token=False)
texts = [open(f, encoding="utf-8").read() for f in files]
reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(texts)]
print(json.dumps({"nll": -sum(lm.loglikelihood_rolling(reqs))}))
'''


def _timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return dt, r.stdout


TASK_QUESTIONS = int(os.environ.get("BENCH_EVAL_TASK_QUESTIONS", 300))


def _local_task(folder: Path, files: list[str], n: int) -> tuple[Path, int]:
    """A multiple-choice task from stdlib lines: a line's first word, then its true rest
    among the rests of three other lines. Returns (task YAML, questions)."""
    import random

    lines = [ln for f in files for ln in Path(f).read_text(encoding="utf-8").splitlines() if 3 <= len(ln.split()) <= 12]
    rng = random.Random(0)
    rows = []
    for ln in rng.sample(lines, n):
        cut = len(ln) - len(ln.lstrip()) + len(ln.split()[0])
        choices = [ln[cut:]] + [o[len(o) - len(o.lstrip()) + len(o.split()[0]):] for o in rng.sample(lines, 3)]
        rng.shuffle(choices)
        rows.append({"context": ln[:cut], "choices": choices, "label": choices.index(ln[cut:])})
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "stdlib_lines.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "stdlib_lines.yaml").write_text(
        f"task: stdlib_lines\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return folder / "stdlib_lines.yaml", len(rows)


def _task_tokens(model: Path, task_data: Path) -> int:
    """Tokens the model reads for the task: every (context + choice) request."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(x) for x in task_data.read_text().splitlines()]
    return sum(len(tok(r["context"] + c)["input_ids"]) for r in rows for c in r["choices"])


def tasks_bench(tmp: Path, model: Path, files: list[str], env: dict) -> tuple[dict, dict]:
    task, n = _local_task(tmp / "task", files, TASK_QUESTIONS)
    cfg = tmp / "t.yaml"
    cfg.write_text(yaml_dump({"run": {"name": "bt", "dir": str(tmp / "trun")},
                              "eval": {"model": str(model), "tasks": [str(task)], "batch_size": BATCH, "perplexity": False, "generation": False}}))

    def ours() -> float:
        dt, out = _timed([sys.executable, "-m", "llmctl", "eval", str(cfg), "--force", "--json"], env)
        ours.res = json.loads(Path(json.loads(out)["results"]).read_text())["tasks"]["stdlib_lines"]
        return dt

    def theirs() -> float:
        outdir = tmp / f"lm_eval_out_{len(runs['lm_eval'])}"
        dt, _ = _timed([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32", "--device", "cpu",
                        "--batch_size", str(BATCH), "--tasks", "stdlib_lines", "--include_path", str(task.parent), "--output_path", str(outdir)], env)
        theirs.res = json.loads(next(outdir.rglob("results_*.json")).read_text())["results"]["stdlib_lines"]
        return dt

    runs: dict[str, list[float]] = {"llmctl": [], "lm_eval": []}
    for k in range(ROUNDS):
        order = [("llmctl", ours), ("lm_eval", theirs)]
        for name, fn in order if k % 2 == 0 else order[::-1]:
            runs[name].append(round(fn(), 3))
            print(f"[eval] tasks round {k + 1} {name}: {runs[name][-1]} s", flush=True)
    tokens = _task_tokens(model, task.parent / "stdlib_lines.jsonl")
    diff = max(abs(ours.res[m] - theirs.res[f"{m},none"]) for m in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"))
    metrics = {"questions": n, "choices": 4, "tokens": tokens, "batch_size": BATCH, "rounds": ROUNDS,
               "llmctl": {"seconds": min(runs["llmctl"]), "tokens_per_s": round(tokens / min(runs["llmctl"]), 1), "acc": ours.res["acc"],
                          "acc_norm": ours.res["acc_norm"], "all_seconds": runs["llmctl"]},
               "lm_eval": {"seconds": min(runs["lm_eval"]), "tokens_per_s": round(tokens / min(runs["lm_eval"]), 1), "acc": theirs.res["acc,none"],
                           "acc_norm": theirs.res["acc_norm,none"], "all_seconds": runs["lm_eval"]},
               "max_abs_difference": diff}
    ratios = {"eval task tokens/s vs lm_eval --model hf (end to end)": ratio(min(runs["lm_eval"]) / min(runs["llmctl"]), 1.0),
              "eval task acc/acc_norm/stderr max abs difference vs lm_eval": ratio(diff, 0.0, higher_is_better=False)}
    return metrics, ratios


def yaml_dump(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d)


def main(size: str = "toy") -> None:
    import yaml

    from llmctl.data.sources import builtin_files

    global ROUNDS
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    if size == "toy":
        model, what, max_bytes = quickstart_model(tmp / "m"), "random llama 4 layers, hidden 128, vocab 4096", MAX_BYTES
    else:  # a 40 KB slice keeps four end-to-end runs of an 85M model to minutes on 2 cores
        from _model import real_model

        model, what, max_bytes = real_model(size), f"bench/_model.py real_model({size!r}) (trained)", int(os.environ.get("BENCH_EVAL_BYTES", 40_000))
        ROUNDS = int(os.environ.get("BENCH_EVAL_ROUNDS", 4))
    files = []
    for f in builtin_files(7, max_bytes):  # stdlib source as written: blank lines, indentation
        dst = tmp / "text" / f"{len(files):03d}_{f.name}"
        dst.parent.mkdir(exist_ok=True)
        shutil.copyfile(f, dst)
        files.append(str(dst))
    cfg = tmp / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"name": "b", "dir": str(tmp / "run")},
                                   "eval": {"model": str(model), "text_paths": files, "max_length": WINDOW, "batch_size": BATCH, "generation": False}}))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}

    def ours() -> float:
        dt, out = _timed([sys.executable, "-m", "llmctl", "eval", str(cfg), "--force", "--json"], env)
        ours.res = json.loads(Path(json.loads(out)["results"]).read_text())["perplexity"]
        return dt

    def theirs() -> float:
        dt, out = _timed([sys.executable, "-c", LM_EVAL, str(model), str(WINDOW), str(BATCH), *files], env)
        theirs.nll = json.loads(out.strip().splitlines()[-1])["nll"]
        return dt

    runs: dict[str, list[float]] = {"llmctl": [], "lm_eval": []}
    for k in range(ROUNDS):
        order = [("llmctl", ours), ("lm_eval", theirs)]
        for name, fn in order if k % 2 == 0 else order[::-1]:
            runs[name].append(round(fn(), 3))
            print(f"[eval] round {k + 1} {name}: {runs[name][-1]} s", flush=True)
    p = ours.res
    tokens = p["tokens"]
    our_nll = p["mean_loss"] * tokens
    rel = abs(our_nll - theirs.nll) / theirs.nll
    import math

    metrics = {
        "tokens": tokens, "files": len(files), "bytes": p["bytes"], "window": WINDOW, "batch_size": BATCH, "rounds": ROUNDS,
        "llmctl": {"seconds": min(runs["llmctl"]), "tokens_per_s": round(tokens / min(runs["llmctl"]), 1), "perplexity": p["perplexity"], "all_seconds": runs["llmctl"]},
        "lm_eval": {"seconds": min(runs["lm_eval"]), "tokens_per_s": round(tokens / min(runs["lm_eval"]), 1),
                    "perplexity": round(math.exp(theirs.nll / tokens), 4), "all_seconds": runs["lm_eval"]},
        "nll_relative_difference": rel, "model": what, "machine": machine(), "uptime": os.popen("uptime").read().strip(),
    }
    from _model import params_of

    ratios = {
        "eval perplexity tokens/s vs lm-eval loglikelihood_rolling": ratio(min(runs["lm_eval"]) / min(runs["llmctl"]), 1.0),
        "eval log-likelihood relative difference vs lm-eval": ratio(rel, 1e-4, higher_is_better=False),
    }
    if size == "toy" and os.environ.get("BENCH_EVAL_TASKS", "1") != "0":
        metrics["tasks"], more = tasks_bench(tmp, model, files, env)
        ratios.update(more)
    write_result("eval" if size == "toy" else f"eval-{size}", metrics, ratios, model_params=params_of(model))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["toy", "85m", "0.5b"], default="toy", help="toy: a random quickstart-sized llama; 85m/0.5b: bench/_model.py's realistic models")
    main(ap.parse_args().size)
