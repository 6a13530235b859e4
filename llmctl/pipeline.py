"""`llmctl run`: the stages in order, each skipping itself when complete and up to date."""

from __future__ import annotations

import time
from typing import Callable, Sequence

from llmctl import console as _console
from llmctl.errors import ConfigError


def stage_range(stages: Sequence[str], first: str | None, last: str | None) -> list[str]:
    for name, value in (("--from", first), ("--to", last)):
        if value is not None and value not in stages:
            raise ConfigError(f"{name} {value!r}: expected one of {', '.join(stages)}")
    i = stages.index(first) if first else 0
    j = stages.index(last) if last else len(stages) - 1
    if i > j:
        raise ConfigError(f"--from {first} comes after --to {last}")
    return list(stages[i : j + 1])


def run_pipeline(cfg, rd, get_stage: Callable, stages: Sequence[str], first=None, last=None) -> dict:
    con = _console.current()
    results: dict[str, dict] = {}
    t0 = time.time()
    for name in stage_range(stages, first, last):
        con.step(f"{name}")
        results[name] = get_stage(name).run(cfg, rd, force=False) or {}
    return {"run_dir": str(rd.root), "seconds": round(time.time() - t0, 1), "stages": results}
