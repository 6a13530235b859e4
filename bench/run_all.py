"""`make bench`: run every benchmark, print one table of ratios, write bench/results.json,
and regenerate the measured passages of README.md and docs/ from it (bench/passages.py).

`python bench/run_all.py NAME...` refreshes only those benchmarks' rows; `--merge NAME...` takes
rows already written to bench/results/ (a bench run by hand, with its own flags) without rerunning. `quickstart` runs the
whole demo (minutes); the others take a minute or two each on 2 CPU cores. The realistic rows
(REALISTIC: compress-85m, eval-85m, train-85m, train-0.5b, bounded) take 10-20 minutes each, and
the first one builds the 85M model (about an hour, cached after; bench/_model.py).

Each bench/<name>.py writes bench/results/<name>.json:
  {"name": ..., "model_params": N, "metrics": {...}, "ratios": {"<ratio>": {"value": v, "target": ">= 3", "pass": bool}}}
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["prepare", "curate", "train", "schedule_fit", "generate", "eval", "serve", "realsize", "serve_32m", "safety", "distill", "compress", "preference", "code_passk", "vision", "quickstart"]
# Rows at the realistic sizes (bench/_model.py; the 85M model trains once, about an hour, then is cached):
# row name -> the script and its arguments.
REALISTIC = {"compress-85m": ["compress.py", "--size", "85m"], "eval-85m": ["eval.py", "--size", "85m"], "train-85m": ["train.py", "--size", "85m"],
             "train-0.5b": ["train.py", "--size", "0.5b"], "bounded": ["bounded.py"]}
BENCHES += list(REALISTIC)


def main() -> int:
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    argv = sys.argv[1:]
    merge = "--merge" in argv
    argv = [a for a in argv if a != "--merge"]
    only = argv or BENCHES
    results, failed = {}, []
    for name in only:
        if merge:
            res_file = out_dir / f"{name}.json"
            if not res_file.is_file():
                raise SystemExit(f"--merge {name}: {res_file} does not exist (run bench/{REALISTIC.get(name, [name + '.py'])[0]} first)")
            results[name] = json.loads(res_file.read_text())
            continue
        script, *args = REALISTIC.get(name, [f"{name}.py"])
        script = HERE / script
        if not script.is_file():
            print(f"[bench] {name}: {script} missing, skipped", flush=True)
            continue
        print(f"[bench] {name} ...", flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, str(script), *args], cwd=HERE.parent)
        res_file = out_dir / f"{name}.json"
        if rc != 0 or not res_file.is_file():
            failed.append(name)
            results[name] = {"error": f"exit {rc}"}
            continue
        results[name] = json.loads(res_file.read_text())
        results[name]["seconds"] = round(time.time() - t0, 1)
    if argv and (HERE / "results.json").is_file():  # a subset refreshes only its rows
        results = {**json.loads((HERE / "results.json").read_text()), **results}  # read now: rows written meanwhile stay
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(f"{'benchmark':<10} {'ratio':<40} {'value':>10} {'target':>10}  pass")
    for name, res in results.items():
        for rname, r in (res.get("ratios") or {}).items():
            print(f"{name:<10} {rname:<40} {r['value']:>10.3f} {r['target']:>10}  {'-' if r['pass'] is None else 'yes' if r['pass'] else 'NO'}")
        if "error" in res:
            print(f"{name:<10} {'(failed: ' + res['error'] + ')':<40}")
    print(f"\nwritten to {HERE / 'results.json'}")
    sys.path.insert(0, str(HERE))
    import passages  # README.md and docs/ quote results.json: refresh their measured passages

    passages.main()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
