"""llmctl/train's pieces alone, without a model: the time plan, the callbacks, checkpoint rotation."""

from __future__ import annotations

import json

import pytest
from transformers import TrainerControl, TrainerState

from llmctl.rundir import RunDir
from llmctl.train.callbacks import CheckpointCallback, MetricsCallback, Outputs, RunState, StopCallback
from llmctl.train.checkpoints import META, complete_checkpoints, rotate
from llmctl.train.schedule import TimeBudget, TimePlan
from llmctl.train.build import Collator


class _Clock:
    """Reads a time that the test sets."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _plan(clock, max_time=100.0, resumed=False) -> TimePlan:
    return TimePlan(TimeBudget.start(max_time, clock), kind="cosine", min_ratio=0.1, decay_fraction=1.0,
                    eval_every=None, save_every=10**6, resumed=resumed)


def _step(plan: TimePlan, sched, clock, step: int, seconds: float) -> float:
    """One optimizer step of `seconds`, then the LambdaLR asks for the next lr."""
    clock.now += seconds
    plan.step_ended()
    return sched(step)


def test_the_plan_fits_the_schedule_to_the_measured_speed():
    clock = _Clock()
    plan = _plan(clock, max_time=100.0)
    sched = plan.make_schedule(warmup=2, total=10_000)
    sched(0)  # the LambdaLR's first value
    for step in range(1, 21):
        _step(plan, sched, clock, step, 1.0)
    assert sched.planned and sched.sec_per_step == pytest.approx(1.0)
    # 20 s spent at 1 s/step, 2 steps in reserve: about 80 more steps.
    assert 95 <= sched.total <= 100 and plan.planned_steps() == sched.total
    assert not plan.has_ended(sched.total - 1, 10_000) and plan.has_ended(sched.total, 10_000)
    assert not plan.has_ended(sched.total, sched.total)  # max_steps ends it, not the plan


def test_the_plan_never_passes_max_steps_and_a_resumed_plan_is_kept():
    clock = _Clock()
    plan = _plan(clock, max_time=1e6)
    sched = plan.make_schedule(warmup=0, total=30)
    sched(0)
    for step in range(1, 20):
        _step(plan, sched, clock, step, 1.0)
    assert sched.planned and sched.total == 30
    resumed = _plan(_Clock(), max_time=1.0, resumed=True)
    again = resumed.make_schedule(warmup=0, total=30)
    again(0)
    again.__dict__.update({"total": 25, "planned": True})  # what LambdaLR restores from scheduler.pt
    for step in range(1, 20):
        again(step)
    assert again.total == 25
    assert "plan" not in again.__dict__  # LambdaLR saves __dict__: the plan is not part of it


def test_evals_and_saves_are_kept_out_of_the_step_time():
    clock = _Clock()
    plan = _plan(clock)
    plan.step_ended()
    clock.now += 5.0
    plan.took("save_s")
    assert plan.times.save_s == 5.0 and plan.times.t_mark == 5.0


def _stop(run, plan, budget, finite=True):
    return StopCallback(run, plan, budget, lambda: finite)


def test_stop_callback_stops_without_a_checkpoint_on_a_non_finite_step():
    clock = _Clock()
    run, control = RunState(), TrainerControl()
    _stop(run, _plan(clock), TimeBudget.start(None, clock), finite=False).on_step_end(None, TrainerState(global_step=7), control)
    assert run.nan_step == 7 and control.should_training_stop and not control.should_save


def test_stop_callback_saves_and_stops_at_the_end_of_the_budget_or_on_a_signal():
    clock = _Clock()
    budget = TimeBudget.start(10.0, clock)
    run, control = RunState(), TrainerControl()
    cb = _stop(run, _plan(clock), budget)
    cb.on_step_end(None, TrainerState(global_step=1, max_steps=5), control)
    assert not control.should_training_stop
    clock.now = 10.0
    cb.on_step_end(None, TrainerState(global_step=2, max_steps=5), control)
    assert control.should_training_stop and control.should_save and run.reason == "max_time"
    run, control = RunState(signal=15), TrainerControl()
    _stop(run, _plan(clock), TimeBudget.start(None, clock)).on_step_end(None, TrainerState(global_step=3), control)
    assert control.should_training_stop and control.should_save and run.reason == "max_steps"


def test_metrics_callback_writes_a_record_and_stops_on_a_logged_nan(tmp_path):
    clock = _Clock()
    run = RunState()
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        out = Outputs(con=None, is_main=False, progress=None, metrics=f, st=None, clock=clock)
        cb = MetricsCallback(run, _plan(clock), TimeBudget.start(None, clock), out, resumed=False, log_keys=("kl_loss",))
        state = TrainerState(global_step=4, num_input_tokens_seen=100)
        cb.on_log(None, state, TrainerControl(), logs={"loss": 2.5, "learning_rate": 1e-3, "kl_loss": 0.5})
        cb.on_log(None, state, TrainerControl(), logs={"eval_loss": 2.0})
        control = TrainerControl()
        cb.on_log(None, TrainerState(global_step=5), control, logs={"loss": float("nan")})
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert recs[0]["loss"] == 2.5 and recs[0]["kl_loss"] == 0.5 and recs[1]["val_loss"] == 2.0
    assert run.val == {4: 2.0} and run.nan_step == 5 and not control.should_save


def test_checkpoint_callback_stamps_moves_and_rotates(tmp_path):
    rd = RunDir(tmp_path / "run")
    clock = _Clock()
    run = RunState(val={2: 1.5})
    out = Outputs(con=None, is_main=True, progress=None, metrics=None, st=None, clock=clock)
    cb = CheckpointCallback(run, _plan(clock), out, rd, fingerprint={"seed": 0}, config_values={}, keep_last=1, keep_best=True)
    args = type("Args", (), {"output_dir": str(rd.checkpoints_dir)})()
    for step in (2, 4, 6):
        (rd.checkpoints_dir / f"checkpoint-{step}").mkdir(parents=True)
        cb.on_save(args, TrainerState(global_step=step), TrainerControl())
    kept = complete_checkpoints(rd)
    assert [p.name for p in kept] == ["step-000002", "step-000006"]  # the best (val 1.5) and the last
    assert json.loads((kept[0] / META).read_text()) == {"step": 2, "fingerprint": {"seed": 0}, "config_values": {}, "val_loss": 1.5}
    (rd.checkpoints_dir / "checkpoint-8").mkdir()  # a save killed before its rename
    rotate(rd, keep_last=1, keep_best=False)
    assert [p.name for p in rd.checkpoints_dir.iterdir()] == ["step-000006"]


def test_collator_pads_rows_of_different_lengths():
    batch = Collator(pad_id=0)([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [-100]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
