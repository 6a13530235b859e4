"""The time budget (`train.max_time`) and the lr schedule fitted to it.

`TimeBudget` is max_time, parsed once by the stage, with the clock it is measured on.
`TimePlan` measures the seconds per step while training and moves the end of a
`TimeFittedSchedule` so that its decay ends when the budget does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from llmctl.train.distributed import agree_min


@dataclass
class TimeBudget:
    """train.max_time in seconds (None: no budget), counted from `t0` on `clock`."""

    max_time: float | None
    clock: Callable[[], float]
    t0: float

    @classmethod
    def start(cls, max_time: float | None, clock: Callable[[], float]) -> "TimeBudget":
        return cls(max_time, clock, clock())

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def spent(self) -> bool:
        return self.max_time is not None and self.elapsed() >= self.max_time


class TimeFittedSchedule:
    """The lr multiplier of a warmup + cosine (to `min_ratio`) or linear (to 0) schedule whose end,
    `total`, is planned while training so that the decay ends when the time budget does.

    The Trainer's `cosine_with_min_lr` and `linear` curves, shifted one step so that the last
    planned step itself trains at the floor, and held there past `total`. As a LambdaLR's lambda
    its __dict__ (plain numbers) is saved in the checkpoint's scheduler.pt and restored on resume,
    so a resumed run keeps the planned schedule exactly. `plan` (a TimePlan, or None) may move
    `total` before each value.
    """

    __slots__ = ("plan", "__dict__")  # `plan` lives in a slot: out of the __dict__ that LambdaLR saves

    def __init__(self, kind: str, warmup: int, total: int, min_ratio: float, decay_fraction: float = 1.0):
        self.plan = None
        self.kind, self.warmup, self.total, self.min_ratio = kind, int(warmup), int(total), float(min_ratio)
        self.decay_fraction = float(decay_fraction)
        self.planned = False  # True once `total` was fitted to the budget
        self.sec_per_step = None  # the measured cost of one step the plan used (evals and saves included)

    def __call__(self, step: int) -> float:
        if self.plan is not None:
            self.plan(self, step)
        if step < self.warmup:
            return step / max(1, self.warmup)
        # The value at `step` is the lr of optimizer step step+1: the last step, `total`, trains at the floor.
        # Warmup-stable-decay: the peak holds until the last `decay_fraction` of the steps after
        # warmup, which decay (1.0: the whole run decays, the Trainer's own curves).
        span = max(1, self.total - 1 - self.warmup)
        decay = max(1, round(span * self.decay_fraction))
        progress = min(1.0, max(0.0, (step - self.warmup - (span - decay)) / decay))
        if self.kind == "linear":
            return 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class StepTimes:
    """Seconds measured while training: the window [t_a, now] of steps s_a..step, minus the evals
    and saves inside it (they are planned separately, per eval_every/save_every steps)."""

    start: int | None = None  # the step the schedule was first asked about
    s_a: int | None = None  # the window's first step
    t_a: float | None = None  # ... and when it began
    excluded: float = 0.0  # seconds of evals and saves inside the window
    eval_s: float = 0.0  # the last eval's duration
    save_s: float = 0.0  # the last save's duration
    t_mark: float | None = None  # the last step boundary, eval or save


class TimePlan:
    """Fits a TimeFittedSchedule's end to the budget.

    The callbacks report step ends, evals and saves (`step_ended`, `took`); the schedule calls the
    plan before each value. `kind`, `min_ratio`, `decay_fraction`: train.scheduler, min_lr_ratio,
    fit_decay_fraction. `eval_every` is None without a validation split.
    """

    def __init__(self, budget: TimeBudget, *, kind: str, min_ratio: float, decay_fraction: float,
                 eval_every: int | None, save_every: int, resumed: bool):
        self.budget = budget
        self.kind, self.min_ratio, self.decay_fraction = kind, min_ratio, decay_fraction
        self.eval_every, self.save_every = eval_every, save_every
        self.times = StepTimes()
        self.replan = not resumed  # a resumed run keeps the schedule its checkpoint planned
        self.sched: TimeFittedSchedule | None = None  # once the Trainer asked for it
        self.cap: int | None = None  # max_steps: the upper bound of any plan

    def make_schedule(self, warmup: int, total: int) -> TimeFittedSchedule:
        """The schedule the Trainer steps (`total`: its max_steps)."""
        self.sched = TimeFittedSchedule(self.kind, warmup, total, self.min_ratio, self.decay_fraction)
        self.sched.plan = self
        self.cap = total
        return self.sched

    def planned_steps(self) -> int | None:
        """Where the fitted schedule ends, once planned."""
        return self.sched.total if self.sched is not None and self.sched.planned else None

    def has_ended(self, step: int, max_steps: int) -> bool:
        """The planned schedule has ended before max_steps (the same on every rank)."""
        return self.planned_steps() is not None and self.sched.total <= step < max_steps

    # ---- timing, reported by the callbacks
    def step_ended(self) -> None:
        self.times.t_mark = self.budget.clock()

    def took(self, key: str) -> None:
        """An eval ("eval_s") or a save ("save_s") just ended: its duration, kept out of the per-step time."""
        t = self.times
        now = self.budget.clock()
        if t.t_mark is not None:
            setattr(t, key, now - t.t_mark)
            if t.t_a is not None:
                t.excluded += getattr(t, key)
        t.t_mark = now

    # ---- planning, called by the schedule
    def __call__(self, sched: TimeFittedSchedule, step: int) -> None:
        t = self.times
        if t.start is None:  # the LambdaLR's first value, before a checkpoint's state is loaded
            t.start = step
            return
        if not self.replan:
            if sched.planned:
                return
            self.replan = True  # resumed from a checkpoint written before any plan: plan from here
            t.start = step
            return
        now = self.budget.clock()
        if t.s_a is None:
            if step >= t.start + 2:  # the first steps carry one-time costs
                t.s_a, t.t_a, t.excluded = step, now, 0.0
            return
        if step < max(sched.warmup, t.s_a + 5):
            return
        if sched.planned and sched.total - step <= max(3, sched.total // 50):
            return  # the end is near and fixed: the steps left were given their lrs, down to the floor
        per_step = self._seconds_per_step(now, step)
        left = self.budget.max_time - (now - self.budget.t0) - 2 * per_step  # two steps in reserve for the machine's jitter
        n = agree_min(max(0, int(left / per_step)))  # every rank must agree on the schedule
        sched.total = max(step, min(self.cap, step + n))
        sched.planned, sched.sec_per_step = True, round(per_step, 6)

    def _seconds_per_step(self, now: float, step: int) -> float:
        """Measured over the window, plus each step's share of the evals and saves to come."""
        t = self.times
        per_step = max(now - t.t_a - t.excluded, 1e-9) / (step - t.s_a)
        per_step += t.eval_s / self.eval_every if self.eval_every is not None else 0.0
        per_step += t.save_s / self.save_every
        return per_step
