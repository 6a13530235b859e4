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


def ratio(value: float, target: float | None, higher_is_better: bool = True) -> dict:
    """A ratio with its target; target None: reported for context, no pass/fail."""
    if target is None:
        return {"value": round(value, 4), "target": "-", "pass": None}
    ok = value >= target if higher_is_better else value <= target
    return {"value": round(value, 4), "target": f"{'>=' if higher_is_better else '<='} {target}", "pass": bool(ok)}


def machine() -> dict:
    """Where a number was measured: CPU count, torch threads and the load average at the time."""
    import os

    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    return {"cpus": os.cpu_count(), "torch_threads": threads, "load_avg_1m": round(os.getloadavg()[0], 2)}


_FROM_METRICS = object()


def model_params(model) -> int:
    """Parameters of a loaded model (tied weights once), the count every row records."""
    return sum(p.numel() for p in model.parameters())


def write_result(name: str, metrics: dict, ratios: dict, model_params=_FROM_METRICS) -> None:
    """bench/results/<name>.json. `model_params`: the parameter count of the model the row measured
    (an int; a dict {role: count} when it measured several; None when it runs no model, e.g.
    tokenization). Left out, it is read from metrics["model_params"] or metrics["params"]."""
    if model_params is _FROM_METRICS:
        model_params = metrics.get("model_params", metrics.get("params"))
    row = {"name": name, "model_params": model_params, "metrics": metrics, "ratios": ratios}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row, indent=2))


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
