"""Checkpoints: RUN/train/checkpoints/step-NNNNNN, complete once they carry META.

The Trainer writes checkpoint-N; `publish` stamps it with what it continues and renames it
into place, so a killed save never leaves a folder that looks complete. `pick_resume` continues
the last one only when every key that changes the result is the same.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

from llmctl.errors import ConfigError, Interrupted
from llmctl.rundir import RunDir, atomic_write_json
from llmctl.train.distributed import world

META = "llmctl.json"  # written into each checkpoint: what it continues
STEP_RE = re.compile(r"^step-(\d{6,})$")


def complete_checkpoints(rd: RunDir) -> list[Path]:
    d = rd.checkpoints_dir
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := STEP_RE.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def train_seed(cfg) -> int:
    return cfg.train.seed if cfg.train.seed is not None else cfg.run.seed


def resume_fingerprint(cfg, rd: RunDir, identity: str | None = None, world_size: int | None = None) -> dict:
    """What a checkpoint must share with the current run to be continued safely.

    `identity`: a hash of inputs outside the run directory (distill's teacher). `world_size`: the
    ranks a launcher is about to start (default: this process's world)."""
    fp = {
        "model": cfg.section_hash("model"),
        "data": (rd.manifest("prepare") or {}).get("id"),
        "micro_batch_size": cfg.train.micro_batch_size,
        "grad_accum": cfg.train.grad_accum,
        "world_size": world_size or world(),
        "seed": train_seed(cfg),
    }
    if identity is not None:
        fp["distill"] = identity  # only when set: plain train checkpoints keep their fingerprint
    return fp


def pick_resume(cfg, rd: RunDir, con, identity: str | None = None, world_size: int | None = None) -> Path | None:
    """The last complete checkpoint, if it continues this config; ConfigError if it cannot.

    `con=None` only checks. A checkpoint continues the run only when every key that changes
    the result is the same: the Trainer restores the optimizer and schedule from the checkpoint,
    so a new lr (say) would be silently ignored while the record claimed it.
    """
    ckpts = complete_checkpoints(rd)
    if not ckpts:
        return None
    last = ckpts[-1]
    meta = json.loads((last / META).read_text())
    diffs, sets = _changes(cfg, rd, meta, identity, world_size)
    if diffs:
        from llmctl.hints import set_flags

        keep = f", or resume it as it was with {set_flags(sets)}" if sets and len(sets) == len(diffs) else ""
        raise ConfigError(
            f"{last} cannot be resumed safely: changed since it was written: {'; '.join(diffs)}. "
            f"Run with --force to start over (this deletes {rd.checkpoints_dir}){keep}"
        )
    if con is not None:
        con.info(f"resuming from {last} (step {meta['step']})")
    return last


def _changes(cfg, rd: RunDir, meta: dict, identity: str | None, world_size: int | None = None) -> tuple[list[str], list[tuple]]:
    """(what differs between a checkpoint's record and this config, the --set flags that undo it)."""
    from llmctl.config import show_value, stage_values, value_changes

    want = resume_fingerprint(cfg, rd, identity, world_size)
    have = meta.get("fingerprint", {})
    recorded = meta.get("config_values")
    keys = [k for k in want if not (recorded is not None and k in ("model", "seed", "micro_batch_size", "grad_accum"))]
    named = {"data": "prepare/ (re-run since)", "distill": "the teacher"}
    diffs = [f"{k} ({have.get(k)} -> {want[k]})" if k not in ("model", "data", "distill") else named.get(k, k) for k in keys if have.get(k) != want[k]]
    sets = []
    if recorded is not None:
        for k, a, b in value_changes(recorded, stage_values(cfg, "train")):
            diffs.append(f"{k}: {show_value(a)} -> {show_value(b)}")
            if a != "(not set)":
                sets.append((k, a))
    return diffs, sets


def publish(src: Path, rd: RunDir, step: int, meta: dict, keep_last: int, keep_best: bool) -> None:
    """The Trainer's checkpoint-N, stamped with `meta`, renamed to step-NNNNNN; then rotation."""
    atomic_write_json(src / META, meta)
    dst = rd.checkpoint_dir(step)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)
    rotate(rd, keep_last, keep_best)


def rotate(rd: RunDir, keep_last: int, keep_best: bool) -> None:
    ckpts = complete_checkpoints(rd)
    keep = set(ckpts[-keep_last:])
    if keep_best:
        scored = [(json.loads((p / META).read_text()).get("val_loss"), p) for p in ckpts]
        scored = [(v, p) for v, p in scored if v is not None]
        if scored:
            keep.add(min(scored, key=lambda t: t[0])[1])
    for p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
    # Partial checkpoints of a killed save never got their step- name: drop them.
    for p in rd.checkpoints_dir.glob("checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)


def interrupted(signum: int, rd: RunDir, resume_cmd: str) -> Interrupted:
    """Interrupted (exit 128+signum) naming the checkpoint it saved and the command that resumes it."""
    name = signal.Signals(signum).name
    last = complete_checkpoints(rd)
    if not last:
        return Interrupted(signum, f"interrupted by {name} before the first checkpoint: run '{resume_cmd}' to start again", hint=resume_cmd)
    step = int(STEP_RE.match(last[-1].name).group(1))
    return Interrupted(signum, f"interrupted by {name}: saved {last[-1]}; run '{resume_cmd}' to resume from step {step}",
                       hint=resume_cmd, result={"step": step, "checkpoint": str(last[-1])})
