"""Bounded at 0.5B: each stage's wall time and peak RSS on the Qwen2.5-0.5B-shaped llama.

The model (bench/_model.py `real_model("0.5b")`: 24 x 896, GQA 14/2, MLP 4864, a 32k BPE
trained locally, random weights) goes through the whole pipeline as a user fine-tunes it:
`llmctl prepare` (its tokenizer, the builtin corpus), `train` (LoRA, a few steps: only the
costs are measured), `eval` (perplexity), `export` (hf + gguf q8_0, with its compression report),
then `serve` (ready, one completion, shut down). Every stage is its own process; its peak RSS
is the kernel's (`wait4` rusage of that process).

Targets (issue #26): no stage above 8 GB peak RSS; eval's peak memory does not grow with the
vocabulary (the same eval on a 128k-vocabulary variant of the model: its working memory, peak
RSS minus the weights, within 10% of the 32k model's); the export report finishes in under
3x the export itself, or limits itself and says so.

    python bench/bounded.py                 # ~15-25 min on 2 quiet cores; writes bench/results/bounded.json
    python bench/bounded.py --from export   # keep the stages already measured (work/stages.json), redo the rest
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from _model import cache_root, params_of, real_model, vocab_variant
from common import HERE, machine, ratio, write_result

SIZE = "0.5b"
GB = 1024**3
# A loaded machine can shrink the run (the memory figures keep their batch shapes; times shrink):
LORA_STEPS = int(os.environ.get("LLMCTL_BENCH_BOUNDED_STEPS", 3))
EVAL_BYTES = int(os.environ.get("LLMCTL_BENCH_BOUNDED_EVAL_BYTES", 12_000))  # the held-out text every eval and the export report score (~3k tokens)
# Eval's loss is computed LOSS_CHUNK_BYTES (64 MB) of logits at a time: 2 windows of 256 positions
# fill that chunk at a 32k vocabulary already, so 32k and 128k both run at the cap and their working
# memory should match (the held-out text is ~2 windows; a batch of 8 holds them all).
EVAL_BATCH = int(os.environ.get("LLMCTL_BENCH_BOUNDED_EVAL_BATCH", 8))


def run_stage(name: str, args: list[str], env: dict, log: Path) -> dict:
    """Run `python -m llmctl ARGS` to the end: wall seconds, peak RSS (MB) and exit code."""
    t0 = time.perf_counter()
    with open(log, "ab") as out:
        p = subprocess.Popen([sys.executable, "-m", "llmctl", *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent)
        _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    res = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "exit_code": p.returncode}
    print(f"[bounded] {name}: {res}", flush=True)
    if p.returncode != 0:
        raise SystemExit(f"[bounded] {name} failed (exit {p.returncode}); see {log}")
    return res


def serve_stage(cfg: Path, env: dict, log: Path) -> dict:
    """`llmctl serve`: seconds until /health answers, one 16-token completion, SIGTERM; peak RSS."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with open(log, "ab") as out:
        p = subprocess.Popen([sys.executable, "-m", "llmctl", "serve", str(cfg), "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                             env=env, cwd=HERE.parent)
    url = f"http://127.0.0.1:{port}"
    ready = None
    try:
        while time.perf_counter() - t0 < 900:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                ready = time.perf_counter() - t0
                break
            except Exception:
                if p.poll() is not None:
                    raise SystemExit(f"[bounded] serve exited with {p.returncode}; see {log}") from None
                time.sleep(0.5)
        name = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=30).read())["data"][0]["id"]
        body = json.dumps({"model": name, "prompt": "def read_config(path):", "max_tokens": 16, "temperature": 0}).encode()
        t1 = time.perf_counter()
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=600).read())
        request_s = time.perf_counter() - t1
    finally:
        p.send_signal(signal.SIGTERM)
    _, status, ru = os.wait4(p.pid, 0)
    res = {"seconds": round(time.perf_counter() - t0, 1), "ready_seconds": round(ready, 1), "request_seconds": round(request_s, 2),
           "completion_tokens": answer["usage"]["completion_tokens"], "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
           "exit_code": os.waitstatus_to_exitcode(status)}
    print(f"[bounded] serve: {res}", flush=True)
    return res


def heldout_text(dst: Path) -> Path:
    """EVAL_BYTES of stdlib source, as written (one document): the text every eval here scores."""
    from llmctl.data.sources import builtin_files

    text = "".join(f.read_text(encoding="utf-8", errors="replace") for f in builtin_files(11, 4 * EVAL_BYTES))[:EVAL_BYTES]
    dst.write_text(text, encoding="utf-8")
    return dst


STAGES = ("prepare", "train", "eval", "export", "serve")


def main(start: str = "prepare") -> None:
    model = real_model(SIZE)
    big = vocab_variant(SIZE, 131072)
    work = cache_root() / SIZE / "bounded"
    done = work / "stages.json"
    if start == "prepare":
        shutil.rmtree(work, ignore_errors=True)  # every stage runs from nothing: costs, not caches
        work.mkdir(parents=True)
    elif not done.is_file():
        raise SystemExit(f"--from {start}: {done} is missing (run without --from first)")
    text = work / "heldout.txt" if start != "prepare" else heldout_text(work / "heldout.txt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    cfg = {"run": {"name": "bounded-0.5b", "dir": str(work / "run")},
           "data": {"source": "builtin", "format": "text", "block_size": 256, "max_bytes": 1_000_000},
           "tokenizer": {"name_or_path": str(model)},
           "model": {"name_or_path": str(model), "lora": {"enabled": True, "r": 8, "alpha": 16}},
           "train": {"max_steps": LORA_STEPS, "micro_batch_size": 2, "warmup_steps": 0, "lr": 2e-4, "eval_every": 1000,
                     "eval_batches": 1, "save_every": 1000, "log_every": 1},
           "eval": {"generation": False, "text_paths": [str(text)], "max_length": 256, "batch_size": EVAL_BATCH},
           "export": {"formats": ["hf", "gguf"], "gguf_types": ["q8_0"], "report": True}}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = work / "stages.log"

    def vocab_eval(name: str, m: Path) -> dict:
        """The same eval on `m`: peak RSS, the weights' size, the rest (working memory)."""
        res = run_stage(f"eval {name} vocabulary", ["eval", str(path), "--model", str(m), "--force", "--set", f"run.dir={work / ('vocab-' + name)}"],
                        env, work / f"vocab-{name}.log")
        weights_mb = sum(f.stat().st_size for f in Path(m).glob("*.safetensors")) / 2**20
        res.update(weights_mb=round(weights_mb, 1), working_mb=round(res["peak_rss_mb"] - weights_mb, 1), params=params_of(m),
                   vocab_size=json.loads((Path(m) / "config.json").read_text())["vocab_size"])
        return res

    # eval memory against the vocabulary: the same text, window and batch on the 32k model and its 128k
    # variant, beside the pipeline (peak RSS is per process; only the wall times share the machine)
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1)
    vocab_jobs = {name: pool.submit(vocab_eval, name, m) for name, m in (("32k", model), ("128k", big))}
    keep = STAGES[: STAGES.index(start)]
    stages = {k: v for k, v in (json.loads(done.read_text()) if done.is_file() else {}).items() if k in keep}
    for st in STAGES[STAGES.index(start):]:
        stages[st] = serve_stage(path, env, log) if st == "serve" else run_stage(st, [st, str(path)] + (["--force"] if st != "prepare" else []), env, log)
        done.write_text(json.dumps(stages, indent=2) + "\n")

    # The export report's own cost: the manifest's per-format timings against the report's.
    man = json.loads((work / "run" / "export" / "manifest.json").read_text())
    export_seconds = sum(float(v.get("seconds", 0)) for v in (man.get("formats_info") or {}).values() if isinstance(v, dict))
    report = man.get("report") or {}
    report_seconds = report.get("seconds")

    vocab = {name: job.result() for name, job in vocab_jobs.items()}
    growth = vocab["128k"]["working_mb"] / vocab["32k"]["working_mb"]

    peak = max(s["peak_rss_mb"] for s in stages.values())
    metrics = {
        "model": f"Qwen2.5-0.5B-shaped llama (24 x 896, GQA 14/2, MLP 4864, 32k BPE trained locally, random weights; {model})",
        "model_params": params_of(model), "lora_steps": LORA_STEPS, "eval_text_bytes": EVAL_BYTES, "eval_batch": f"{EVAL_BATCH} x 256", "stages": stages, "peak_rss_mb": peak,
        "export_seconds_formats": round(export_seconds, 1), "export_report_seconds": report_seconds,
        "export_report_limit": report.get("limit"), "export_report_notes": report.get("notes"),
        "eval_vocabulary": vocab, "machine": machine(), "uptime": os.popen("uptime").read().strip(),
    }
    ratios = {
        "bounded 0.5B: largest stage peak RSS, GB (lower better)": ratio(peak * 2**20 / GB, 8.0, higher_is_better=False),
        "bounded 0.5B: eval working memory 128k vocab / 32k vocab": ratio(growth, 1.1, higher_is_better=False),
    }
    if report_seconds is not None and export_seconds:
        ratios["bounded 0.5B: export report time / export time"] = ratio(report_seconds / export_seconds, 3.0, higher_is_better=False)
    write_result("bounded", metrics, ratios, model_params=params_of(model))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="start", choices=STAGES, default="prepare", help="redo the stages from this one on, keeping the earlier ones' figures")
    main(ap.parse_args().start)
