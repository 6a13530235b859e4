"""Cost of data curation in `llmctl prepare` on the quickstart corpus.

Runs the quickstart's prepare twice in fresh processes, with curation (the default) and with
`data.curate.enabled=false`. The ratio is the extra CPU time of the curated run over its
whole CPU time (CPU, not wall, so a busy machine does not decide the result); the curation
step's own wall and CPU time (report.json) are reported beside it. Target: < 15%.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine, ratio, write_result

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "quickstart.yaml"
MAX_BYTES = 8_000_000

SCRIPT = r'''
import json, resource, sys, time
from llmctl.config import load_config
from llmctl.rundir import RunDir
from llmctl.stages import prepare
cfg = load_config(sys.argv[1], sys.argv[2:])
t0 = time.perf_counter()
prepare.run(cfg, RunDir(cfg.run.dir), force=True)
dt = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
rd = RunDir(cfg.run.dir)
rep = json.loads(rd.report_path.read_text()) if rd.report_path.is_file() else None
print(json.dumps({"seconds": dt, "cpu_seconds": ru.ru_utime + ru.ru_stime, "report": rep}))
'''


def _prepare(run_dir: str, *sets: str) -> dict:
    args = [sys.executable, "-c", SCRIPT, str(CONFIG), f"run.dir={run_dir}", f"data.max_bytes={MAX_BYTES}", *sets]
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=HERE.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from llmctl.data.curate import summary_lines

    at_start = machine()
    with tempfile.TemporaryDirectory() as tmp:
        on = _prepare(f"{tmp}/on")
        off = _prepare(f"{tmp}/off", "data.curate.enabled=false")
    rep = on["report"]
    removed = {s: v["documents"] for s, v in rep["removed"].items() if v["documents"]}
    extra_cpu = on["cpu_seconds"] - off["cpu_seconds"]
    metrics = {
        "prepare_seconds": round(on["seconds"], 2),
        "prepare_seconds_without_curation": round(off["seconds"], 2),
        "prepare_cpu_seconds": round(on["cpu_seconds"], 2),
        "prepare_cpu_seconds_without_curation": round(off["cpu_seconds"], 2),
        "curation_step_seconds": rep["seconds"],
        "curation_step_cpu_seconds": rep["cpu_seconds"],
        "documents_before": sum(s["documents_before"] for s in rep["splits"].values()),
        "documents_after": sum(s["documents_after"] for s in rep["splits"].values()),
        "removed": removed,
        "near_duplicate_examples": [(e["doc"], e["duplicate_of"], e["jaccard"]) for e in rep["near_duplicates"].get("examples", [])],
        "pii": rep["pii"]["by_kind"],
        "corpus_bytes_cap": MAX_BYTES,
        "machine": at_start,
        "summary": summary_lines(rep),  # what prepare printed: README quotes it (bench/passages.py)
    }
    write_result("curate", metrics, model_params=None, ratios={"curation share of prepare CPU time (lower better)": ratio(max(extra_cpu, 0.0) / on["cpu_seconds"], 0.15, higher_is_better=False)})


if __name__ == "__main__":
    main()
