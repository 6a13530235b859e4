"""pass@k where it moves: `llmctl run configs/code_passk.yaml` (a tiny llama fine-tuned on the
train half of the shipped code tasks, then sampled on the same tasks in the sandbox), with
`eval.compare_init` giving the same numbers for the model before training, and the fine-tuned
model once more on the test half of the tasks, which it never saw.

It shows the metric and the sandbox on a model that can pass; it is memorisation, not a
claim about generalisation. Fresh run directory each time; minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from common import HERE, machine, ratio, write_result

CONFIG = HERE.parent / "configs" / "code_passk.yaml"


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-code-"))
    # BENCH_CODE_RUN_DIR: a run directory of this config to continue (`llmctl run` skips what is complete)
    run_dir = Path(os.environ.get("BENCH_CODE_RUN_DIR") or tmp / "run")
    start = machine()
    r = subprocess.run([sys.executable, "-m", "llmctl", "run", str(CONFIG), "--run-dir", str(run_dir), "--json"],
                       capture_output=True, text=True, cwd=HERE.parent, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if r.returncode != 0:
        raise SystemExit(f"llmctl run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    res = json.loads((run_dir / "eval" / "results.json").read_text())
    code, init = res["code"], res["init"]
    # the held-out half: the same model on the test tasks it never saw (its own eval, after the numbers above are read)
    t = subprocess.run([sys.executable, "-m", "llmctl", "eval", str(CONFIG), "--run-dir", str(run_dir), "--set", "eval.code.split=test",
                        "--set", "eval.compare_init=false", "--set", "eval.generation=false", "--json"],
                       capture_output=True, text=True, cwd=HERE.parent, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if t.returncode != 0:
        raise SystemExit(f"llmctl eval (test tasks) failed ({t.returncode}):\n{t.stderr[-3000:]}")
    test = json.loads((run_dir / "eval" / "results.json").read_text())["code"]
    c = yaml.safe_load(CONFIG.read_text())["eval"]["code"]
    after = {k: v for k, v in code.items() if k.startswith("pass@")} | {"outcomes": code["outcomes"]}
    before = {k: v for k, v in init.items() if k.startswith("pass@")} | {"outcomes": init.get("code_outcomes")}
    metrics = {"tasks": code["tasks"], "samples": code["samples_per_task"], "temperature": c["temperature"], "split": code["split"],
               "before": before, "after": after, "test_tasks": test["tasks"],
               "after_on_test_tasks": {k: v for k, v in test.items() if k.startswith("pass@")} | {"outcomes": test["outcomes"]},
               "isolation": code["isolation"], "machine": start}
    write_result("code_passk", metrics, {
        "code pass@1 after fine-tuning on its train tasks": ratio(after["pass@1"], None),
        "code pass@1 before training": ratio(before["pass@1"], None),
        "code pass@1 after fine-tuning, on the held-out test tasks": ratio(metrics["after_on_test_tasks"]["pass@1"], None),
    })
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
