"""When a stage's output is stale: the config keys each stage depends on, and how they changed.

A stage records `stage_values` (dotted key -> value) in its manifest; `llmctl.rundir` compares
them with the current config through `value_changes`. Bookkeeping keys (logging, cadence,
workers) never make a stage stale; `time_fitted` decides per config whether train's time
budget is one of its result keys.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from llmctl.config.schema import Config, TrainConfig, get_path, parse_duration

# Which config sections each stage's output depends on (besides its input stages).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare": ("data", "tokenizer", "run.seed"),
    "train": ("model", "train", "run.seed", "distill"),
    "eval": ("eval", "safety"),
    "generate": ("generate", "safety"),
    "export": ("export",),
}

# Keys inside those sections that never change a stage's output: logging, evaluation and
# checkpoint cadence, budgets, workers, process count. Changing them never makes a stage stale,
# and a resumed run may change them. One exception is decided per config: `time_fitted`.
BOOKKEEPING_KEYS: dict[str, tuple[str, ...]] = {
    "prepare": ("data.num_proc",),
    "train": (
        "train.log_every",
        "train.eval_every",
        "train.eval_batches",
        "train.save_every",
        "train.keep_last",
        "train.keep_best",
        "train.max_time",
        "train.tensorboard",
        "train.report_to",
        "train.max_restarts",
        "train.nproc",
        "train.num_workers",
        "train.gradient_checkpointing",
    ),
    "eval": ("eval.thresholds",),  # checked again on every run, even a cached one
}


def stage_kind(stage: str) -> str:
    """'eval-<model>' (an evaluation of another model) is an eval; every other stage is itself."""
    base = stage.split("-", 1)[0]
    return base if base in STAGE_SECTIONS and base != stage else stage


def _leaves(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _leaves(f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def stage_values(cfg: Config, stage: str) -> dict[str, Any]:
    """The config keys (dotted) that a stage's output depends on, with their values."""
    kind = stage_kind(stage)
    dump = cfg.model_dump(mode="json")
    out: dict[str, Any] = {}
    for s in STAGE_SECTIONS.get(kind, ()):
        _leaves(s, get_path(dump, s), out)
    skip = BOOKKEEPING_KEYS.get(kind, ())
    values = {k: v for k, v in out.items() if not any(k == b or k.startswith(b + ".") for b in skip)}
    if kind == "train" and time_fitted(cfg.train):
        # The schedule is planned against the budget: another max_time trains another model.
        # Recorded in seconds, so '1h' and 3600 are the same run.
        values["train.max_time"] = parse_duration(cfg.train.max_time)
    return values


def time_fitted(tcfg: TrainConfig) -> bool:
    """Whether the lr schedule is fitted to `train.max_time` (then the budget is a result key)."""
    return bool(tcfg.fit_schedule_to_time and tcfg.max_time is not None and tcfg.scheduler != "constant")


def values_hash(values: dict[str, Any]) -> str:
    blob = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_DEFAULTS: dict[str, Any] | None = None


def _default_values() -> dict[str, Any]:
    global _DEFAULTS
    if _DEFAULTS is None:
        _DEFAULTS = {}
        _leaves("", Config().model_dump(mode="json"), _DEFAULTS)
        _DEFAULTS = {k.lstrip("."): v for k, v in _DEFAULTS.items()}
    return _DEFAULTS


def value_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, recorded, current) for each key whose value differs.

    A key the record lacks (added to the schema since) counts as changed only when its current
    value is not the default: a new key at its default describes what the old code did.
    """
    missing = object()
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, missing), new.get(k, missing)
        if a is missing:
            if b == _default_values().get(k, missing):
                continue
            a = "(not set)"
        if b is missing:
            b = "(not set)"
        if a != b:
            out.append((k, a, b))
    return out


def show_value(v: Any) -> str:
    """A value as it would be written in YAML or after --set."""
    if isinstance(v, str):
        return v
    return json.dumps(v)
