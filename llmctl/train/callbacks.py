"""What llmctl adds to each Trainer step, one callback per concern.

- MetricsCallback: metrics.jsonl, the progress bar, the step in the manifest (`llmctl status`).
- StopCallback: stop on a non-finite step (no checkpoint), on SIGTERM/SIGINT or at the end of
  the time budget (with a checkpoint).
- CheckpointCallback: the Trainer's checkpoint-N becomes step-NNNNNN, stamped and rotated.
- TimingCallback: tells the time plan how long evals and saves took.

They share nothing but what they are given: `RunState` (what happened, read by the stage
afterwards), the `TimePlan`, the `TimeBudget` and `Outputs`. Imports transformers: load lazily.
"""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from transformers import TrainerCallback

from llmctl.rundir import RunDir
from llmctl.train.checkpoints import publish
from llmctl.train.distributed import agree_any, barrier, rank
from llmctl.train.schedule import TimeBudget, TimePlan


@dataclass
class RunState:
    """What happened while training: written by the callbacks and the signal handler, read by the stage."""

    signal: int | None = None  # SIGTERM/SIGINT received: save, stop, exit 128+signal
    reason: str = "max_steps"  # what ended the run: max_steps or max_time
    nan_step: int | None = None  # the step whose loss or gradient norm was not finite
    val: dict[int, float] = field(default_factory=dict)  # validation loss by step

    def on_signal(self, signum, frame) -> None:
        self.signal = signum

    def stop_for_nan(self, step: int, control) -> None:
        self.nan_step = step
        control.should_save = False  # a checkpoint saved after a NaN must never exist
        control.should_training_stop = True


@dataclass
class Outputs:
    """Where progress goes. Rank 0 alone writes: elsewhere `metrics` and `st` are None."""

    con: Any
    is_main: bool
    progress: Any  # the console's progress bar (rank 0) or a no-op context
    metrics: TextIO | None  # RUN/train/metrics.jsonl, appended to
    st: Any  # the train manifest's writer (rd.begin's), or None
    clock: Callable[[], float]

    def write(self, rec: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(rec) + "\n")
            self.metrics.flush()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()

    def record_progress(self, step: int, total: int, checkpoint: int | None = None, every: float = 0.0) -> None:
        """The step reached, of how many, and the last checkpoint (where a re-run resumes) in the
        train manifest, for `llmctl status`: running at step N/M, or interrupted at step N/M.
        `every`: write at most that often (seconds); a checkpoint is always written."""
        if self.st is None:  # ranks > 0 write nothing shared
            return
        prog = self.st.manifest.setdefault("progress", {})
        now = self.clock()
        if checkpoint is None and now - prog.get("time", 0.0) < every:
            return
        prog.setdefault("first_step", int(step))  # where this process began (0, or the step it resumed from): for the ETA
        prog.update(step=int(step), total=int(total) if total and total > 0 else None, time=round(now, 3))
        if checkpoint is not None:
            prog["checkpoint_step"] = int(checkpoint)
        self.st.save()


def ppl(loss: float | None) -> float:
    return math.exp(min(loss, 50.0)) if loss is not None else float("nan")


def _f(v):
    return None if v is None else float(v)


class MetricsCallback(TrainerCallback):
    """One metrics.jsonl record per log (loss, lr, tokens/s, val loss), the bar, the manifest's step."""

    def __init__(self, run: RunState, plan: TimePlan, budget: TimeBudget, out: Outputs, *, resumed: bool, log_keys: tuple = (),
                 perplexity: bool = True):
        self.run, self.plan, self.budget, self.out = run, plan, budget, out
        self.resumed, self.log_keys = resumed, log_keys
        self.perplexity = perplexity  # False: the val loss is a preference loss, exp() of it means nothing
        self.t_start = budget.clock()
        self.tokens_at_start = None

    def on_train_begin(self, args, state, control, **kw):
        # A resumed Trainer takes the log/eval/save cadence from the checkpoint's state; the
        # config may change them on resume (they never change the result), so apply ours.
        state.compute_steps(args, state.max_steps)
        self.t_start = self.budget.clock()
        self.tokens_at_start = state.num_input_tokens_seen
        if self.out.is_main:
            self.out.progress.total = state.max_steps
            self.out.progress.update(completed=state.global_step)
        self.out.record_progress(state.global_step, state.max_steps, checkpoint=state.global_step if self.resumed else None)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        rec = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "elapsed_s": round(self.budget.elapsed(), 2)}
        if "loss" in logs:
            rec.update(self._train_numbers(state, control, logs))
        if "eval_loss" in logs:
            vl = float(logs["eval_loss"])
            self.run.val[state.global_step] = vl
            rec.update(val_loss=vl, **({"val_ppl": ppl(vl)} if self.perplexity else {}))
            rec.update({k: logs[k] for k in self.log_keys if k.startswith("eval_") and k in logs})
            if self.out.is_main:
                more = f"  val_ppl {ppl(vl):.2f}" if self.perplexity else "".join(
                    f"  {k.removeprefix('eval_')} {logs[k]:.3f}" for k in self.log_keys if k.startswith("eval_") and k in logs)
                self.out.con.info(f"step {state.global_step}: val_loss {vl:.4f}{more}")
        if len(rec) > 3:
            self.out.write(rec)
        self.out.record_progress(state.global_step, state.max_steps, every=10.0)
        return control

    def _train_numbers(self, state, control, logs: dict) -> dict:
        loss = float(logs["loss"])
        gn = logs.get("grad_norm")
        if not math.isfinite(loss) or (gn is not None and not math.isfinite(float(gn))):
            self.run.stop_for_nan(state.global_step, control)
        el = max(self.budget.clock() - self.t_start, 1e-9)
        tps = (state.num_input_tokens_seen - (self.tokens_at_start or 0)) / el
        rec = dict(loss=loss, lr=float(logs.get("learning_rate", 0.0)), grad_norm=_f(gn), tokens=int(state.num_input_tokens_seen), tokens_per_s=round(tps, 1))
        rec.update({k: float(logs[k]) for k in self.log_keys if k in logs})
        planned = self.plan.planned_steps()
        if planned is not None:
            rec["planned_steps"] = planned
            if self.out.is_main:
                self.out.progress.total = planned  # the bar and its ETA follow the plan
        if self.out.is_main:
            self.out.progress.update(completed=state.global_step, loss=loss, lr=rec["lr"], tok_s=round(tps))
        return rec


class StopCallback(TrainerCallback):
    """Ends training at a step every rank agrees on: a non-finite step (checked every step, not only
    at log steps) stops without saving; a signal or the end of the budget saves, then stops."""

    def __init__(self, run: RunState, plan: TimePlan, budget: TimeBudget, step_was_finite: Callable[[], bool]):
        self.run, self.plan, self.budget = run, plan, budget
        self.step_was_finite = step_was_finite

    def on_step_end(self, args, state, control, **kw):
        if agree_any(not self.step_was_finite()):
            self.run.stop_for_nan(state.global_step, control)
            return control
        out_of_time = self.budget.spent() or self.plan.has_ended(state.global_step, state.max_steps)
        self.plan.step_ended()
        if agree_any(self.run.signal is not None or out_of_time):
            if self.run.signal is None:
                self.run.reason = "max_time"
            control.should_save = True
            control.should_training_stop = True
        return control


class CheckpointCallback(TrainerCallback):
    """The Trainer finished writing checkpoint-N: rank 0 stamps it with what it continues
    (`fingerprint`, `config_values`) and moves it into place; every rank waits for that."""

    def __init__(self, run: RunState, plan: TimePlan, out: Outputs, rd: RunDir, *, fingerprint: dict, config_values: dict,
                 keep_last: int, keep_best: bool):
        self.run, self.plan, self.out, self.rd = run, plan, out, rd
        self.fingerprint, self.config_values = fingerprint, config_values
        self.keep_last, self.keep_best = keep_last, keep_best

    def on_save(self, args, state, control, **kw):
        barrier()
        src = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.out.is_main and src.is_dir():
            step = state.global_step
            meta = {"step": step, "fingerprint": self.fingerprint, "config_values": self.config_values, "val_loss": self.run.val.get(step)}
            if self.plan.sched is not None:
                meta["planned_steps"] = self.plan.planned_steps()
            publish(src, self.rd, step, meta, self.keep_last, self.keep_best)
            self.out.record_progress(step, state.max_steps, checkpoint=step)
        barrier()
        _fault_kill_after_save(state.global_step)
        return control


def _fault_kill_after_save(step: int) -> None:
    """Fault injection for the resume and restart tests: SIGKILL this process, as the OOM killer
    would, once checkpoint `step` is in place. LLMCTL_FAULT_KILL_AFTER_SAVE: the steps ("4" or
    "2,4"); LLMCTL_FAULT_KILL_RANK: which rank dies (default 0)."""
    steps = os.environ.get("LLMCTL_FAULT_KILL_AFTER_SAVE", "").split(",")
    if str(step) in steps and os.environ.get("LLMCTL_FAULT_KILL_RANK", "0") == str(rank()):
        os.kill(os.getpid(), signal.SIGKILL)


class TimingCallback(TrainerCallback):
    """Evals and saves are planned apart from the steps: the plan learns how long each took."""

    def __init__(self, plan: TimePlan):
        self.plan = plan

    def on_evaluate(self, args, state, control, **kw):
        self.plan.took("eval_s")
        return control

    def on_save(self, args, state, control, **kw):
        self.plan.took("save_s")
        return control
