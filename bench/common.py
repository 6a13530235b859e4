"""Helpers shared by the benchmarks: result files, peak RSS, timing."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ratio(value: float, target: float, higher_is_better: bool = True) -> dict:
    ok = value >= target if higher_is_better else value <= target
    return {"value": round(value, 4), "target": f"{'>=' if higher_is_better else '<='} {target}", "pass": bool(ok)}


def write_result(name: str, metrics: dict, ratios: dict) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"name": name, "metrics": metrics, "ratios": ratios}, indent=2) + "\n")
    print(json.dumps({"name": name, "metrics": metrics, "ratios": ratios}, indent=2))


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
