"""The quickstart's own figures: `llmctl run configs/quickstart.yaml` from scratch, timed.

    python bench/quickstart.py                 # runs it in a temporary directory (minutes)
    python bench/quickstart.py --from-run DIR  # records a finished run of the same config instead
                                               # (time = the stages' own durations, summed)

Writes bench/results/quickstart.json: wall time, data, model, training, perplexity and BLEU
before/after with their baselines, export sizes; bench/passages.py quotes them in README.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, ratio, write_result

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "quickstart.yaml"
STAGES = ("prepare", "train", "eval", "generate", "export")


def collect(run_dir: Path) -> dict:
    from llmctl.pipeline import summarize
    from llmctl.rundir import RunDir

    rd = RunDir(run_dir)
    man = {s: rd.manifest(s) or {} for s in STAGES}
    missing = [s for s in STAGES if man[s].get("status") != "complete"]
    if missing:
        raise SystemExit(f"{run_dir}: stages not complete: {', '.join(missing)}")
    p, t, e = man["prepare"]["headline"], man["train"]["headline"], man["eval"]["headline"]
    return {
        "stage_seconds": {s: man[s].get("seconds") for s in STAGES},
        "documents": p.get("documents"), "train_tokens": p.get("train_tokens"),
        "train": {k: t.get(k) for k in ("parameters", "steps", "seconds", "tokens_per_s", "init_val_ppl", "val_ppl")},
        "eval": {k: e.get(k) for k in ("perplexity", "init_perplexity", "baseline_unigram_perplexity", "bleu", "init_bleu",
                                       "baseline_copy_bleu", "chrf", "exact_match", "examples")},
        "exports": summarize(rd).get("exports"),
    }


def main() -> None:
    m = machine()
    if sys.argv[1:2] == ["--from-run"]:
        run_dir = Path(sys.argv[2])
        metrics = collect(run_dir)
        seconds, how = sum(v or 0 for v in metrics["stage_seconds"].values()), "the stages' durations, summed"
    else:
        run_dir = Path(tempfile.mkdtemp(prefix="bench-quickstart-")) / "run"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "llmctl", "run", str(CONFIG), "--run-dir", str(run_dir), "-q"], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        seconds, how = time.perf_counter() - t0, "wall clock"
        metrics = collect(run_dir)
    metrics.update({"seconds": round(seconds, 1), "seconds_measured_as": how, "cpus": m["cpus"], "machine": m})
    e = metrics["eval"]
    write_result("quickstart", metrics, model_params=metrics["train"]["parameters"], ratios={
        "quickstart BLEU vs copy-the-prompt baseline": ratio(e["bleu"] / max(e["baseline_copy_bleu"], 1e-9), 2.0),
        "quickstart BLEU vs the untrained model": ratio(e["bleu"] / max(e["init_bleu"], 1e-9), 5.0),
        "quickstart perplexity vs unigram baseline (lower better)": ratio(e["perplexity"] / e["baseline_unigram_perplexity"], 1.0, higher_is_better=False),
    })


if __name__ == "__main__":
    main()
