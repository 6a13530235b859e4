"""The training lifecycle shared by `llmctl train` and `llmctl distill`.

    run     checks (up to date? a finished run changed? a resumable checkpoint?), the lock,
            torchrun; then train:
    train   setup -> loop -> finish
    setup   tokenizer, data, model, TrainingArguments, the Trainer and llmctl's callbacks
    loop    trainer.train() under our SIGTERM/SIGINT handlers, with the first and last evals
    finish  (llmctl.train.finish) why it stopped, the result, the final model

`train.max_time` goes down once: `run` parses it and starts the TimeBudget where training
starts; `setup` hands that budget to the stop callback and the time plan, which read it.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from llmctl import console as _console
from llmctl.config import parse_duration
from llmctl.errors import ConfigError
from llmctl import trackers
from llmctl.rundir import RunDir
from llmctl.train.checkpoints import pick_resume, resume_fingerprint
from llmctl.train.distributed import rank, world
from llmctl.train.schedule import TimeBudget, TimePlan

if TYPE_CHECKING:
    from llmctl.train.callbacks import MetricsCallback, Outputs, RunState


@dataclass
class Hooks:
    """What a variant of training (`llmctl distill`) changes; the defaults are plain `llmctl train`.

    Everything else (checkpoints, resume, signals, budget, metrics, torchrun, the final save
    into RUN/train) stays the one machinery below.
    """

    name: str = "train"  # the command, for messages
    build_model: Callable[[Any, Any], Any] | None = None  # (cfg, tokenizer) -> model; None: model section
    trainer_class: Any = None  # a transformers.Trainer subclass (e.g. its own compute_loss); None: Trainer
    trainer_kwargs: dict = field(default_factory=dict)  # extra keyword arguments for trainer_class
    identity: str | None = None  # hash of inputs outside the run dir (a teacher): part of up-to-date and resume checks
    manifest: dict = field(default_factory=dict)  # extra keys for RUN/train/manifest.json (their lineage)
    headline: dict = field(default_factory=dict)  # extra headline numbers (filled in while training)
    log_keys: tuple = ()  # extra keys of the Trainer's logs to copy into metrics.jsonl
    processor: Callable[[Path], Any] | None = None  # (tokenizer dir) -> a processor saved with the model (image-text); None: the tokenizer
    collator: Callable[[int], Any] | None = None  # (pad id) -> the data collator (image-text rows); None: build.Collator


# --------------------------------------------------------------------------- run: checks, lock, torchrun
def run(cfg, rd: RunDir, *, force: bool = False, nproc: int | None = None, hooks: Hooks | None = None,
        clock: Callable[[], float] = time.time, nodes: dict | None = None, **_) -> dict:
    """RUN/prepare -> RUN/train. `clock`: what the time budget and the timings are measured on.
    `nodes`: --nnodes/--node-rank/--master-addr/--master-port/--rdzv-endpoint/--rdzv-id (llmctl.train.launch.Nodes)."""
    from llmctl.train import restart
    from llmctl.train.launch import Nodes

    hooks = hooks or Hooks()
    where = Nodes(**{k: v for k, v in (nodes or {}).items() if v is not None}).check()
    if hooks.name == "train" and getattr(cfg, "distill", None) is not None:
        from llmctl.hints import command

        raise ConfigError(f"{cfg.source} has a distill section: run '{command('distill', cfg, rd.root)}' (or remove the section to train without a teacher)")
    con = _console.current()
    trackers.check_installed(trackers.wanted(cfg.train))  # exit 2 before any work
    nproc = nproc or cfg.train.nproc
    is_main = rank() == 0
    rd.require("prepare", cfg)
    if not force and rd.up_to_date("train", cfg, extra_hash=hooks.identity):
        con.info(f"{hooks.name}: up to date in {rd.stage_dir('train')} (use --force to redo)")
        return {**rd.manifest("train")["headline"], "cached": True}
    max_time = parse_duration(cfg.train.max_time)
    if not force:
        # Refuse before anything is touched: the record must keep describing what is there.
        refuse_changed_finished_run(cfg, rd, hooks)
        # A launcher checks against the world its ranks will form, not its own single process.
        pick_resume(cfg, rd, None, hooks.identity, nproc * where.nnodes if "LOCAL_RANK" not in os.environ else None)
    resume_cmd = resume_command(cfg, rd, hooks, nproc, where.flags())
    if restart.supervises(cfg, nproc, where.nnodes) and not where.given:
        return restart.supervise(cfg, rd, resume_cmd, force)  # runs this command again as a child, restarted after a crash
    if (nproc > 1 or where.given) and "LOCAL_RANK" not in os.environ:
        from llmctl.train.launch import launch_torchrun

        launch_torchrun(nproc, rd, resume_cmd, where, cfg.train.max_restarts)
        return rd.manifest("train")["headline"]  # rank 0's result

    ctx = rd.begin("train", cfg, inputs=["prepare"], extra_hash=hooks.identity) if is_main else nullcontext()
    with ctx as st:
        if st is not None and (hooks.manifest or cfg.train.method != "sft"):
            st.manifest.update(hooks.manifest)
            if cfg.train.method != "sft":  # lineage: what the preference loss measured against
                from llmctl.train.preference import reference_lineage

                st.manifest["preference"] = reference_lineage(cfg)
            st.save()
        # Under the lock: a second `--force` cannot wipe the checkpoints of a running job.
        if force and is_main:
            _clear_outputs(rd)
        if world() > 1:
            _join_ranks(cfg)
        resume = pick_resume(cfg, rd, con, hooks.identity)
        budget = TimeBudget.start(max_time, clock)  # the budget counts from here
        result = train(cfg, rd, st, resume, budget, con, is_main, hooks, resume_cmd)
        result.update(hooks.headline)
        if st is not None:
            st.headline.update(result)
    return result


def _clear_outputs(rd: RunDir) -> None:
    """--force: the checkpoints, model, adapter and metrics of the previous run go."""
    for p in (rd.checkpoints_dir, rd.model_dir, rd.adapter_dir, rd.metrics_path):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _join_ranks(cfg) -> None:
    """The same shared state TrainingArguments builds (gloo on CPU, nccl on GPU): creating it
    ourselves first would otherwise leave the Trainer thinking it runs alone."""
    import torch.distributed as dist
    from accelerate import PartialState

    from llmctl.modeling import pick_device

    PartialState(cpu=pick_device(cfg.train.device).type == "cpu")
    dist.barrier()  # ranks > 0 wait for rank 0's clean-up


def refuse_changed_finished_run(cfg, rd: RunDir, hooks: Hooks) -> None:
    """A complete train stage whose result-changing config differs is never continued or edited."""
    m = rd.manifest("train")
    if not m or m.get("status") != "complete":
        return
    why = rd.staleness("train", cfg)
    if not why and m.get("extra_hash") != hooks.identity:
        why = "its inputs outside the run (the teacher) changed since it ran"
    if why:
        from llmctl.hints import command

        fix = command(hooks.name, cfg, rd.root, "--force")
        raise ConfigError(
            f"{rd.stage_dir('train')} is complete and {why}. Training again would not continue it: "
            f"run '{fix}' to start over (deletes its checkpoints and model){rd.keep_hint('train', cfg)}",
            hint=fix,
        )


def resume_command(cfg, rd: RunDir, hooks: Hooks, nproc: int, node_flags: list[str] = ()) -> str:
    """The command that continues this run from its last checkpoint: the same config, --set flags,
    run directory, process count and nodes (a checkpoint resumes only on the same world size); no --force."""
    from llmctl.hints import command

    return command(hooks.name, cfg, rd.root, *(["--nproc", str(nproc)] if nproc != cfg.train.nproc else []), *node_flags)


# --------------------------------------------------------------------------- train: setup -> loop -> finish
def train(cfg, rd: RunDir, st, resume: Path | None, budget: TimeBudget, con, is_main: bool, hooks: Hooks,
          resume_cmd: str) -> dict:
    """One training process, from `resume` (a checkpoint) or from scratch; the result's numbers."""
    from llmctl.train import finish

    t = setup(cfg, rd, st, resume, budget, con, is_main, hooks)
    init_val, final_val = loop(t, resume, cfg.train.micro_batch_size)
    finish.raise_if_stopped(t.run, rd, resume_cmd)
    if t.probe is not None:
        _check_reference(t, st, con, cfg)
    result = finish.summarize(t.trainer.state, t.run, t.plan, budget, rd, init_val=init_val, final_val=final_val,
                              n_params=t.n_params, n_trainable=t.n_trainable, device=t.device, perplexity=cfg.train.method == "sft")
    finish.save_final(t.trainer, t.tok, cfg, rd, is_main, hooks.build_model)  # every rank: under FSDP the save is collective
    if st is not None:
        st.manifest["device"] = str(t.device)
        if trackers.wanted(cfg.train):
            finish.report_to_trackers(rd, st.manifest, result)
    return result


@dataclass
class Training:
    """What `setup` builds for `loop` and `finish`."""

    trainer: Any
    model: Any
    tok: Any
    val_ds: Any  # None: no validation split
    collate: Any
    device: Any
    n_params: int
    n_trainable: int
    run: RunState  # what happened, filled in while training
    plan: TimePlan
    budget: TimeBudget
    metrics: MetricsCallback  # the first eval is logged through it
    out: Outputs
    probe: Any = None  # preference methods, rank 0: the reference's log-probs (preference.ReferenceProbe)


def setup(cfg, rd: RunDir, st, resume: Path | None, budget: TimeBudget, con, is_main: bool, hooks: Hooks) -> Training:
    """Tokenizer, data, model, arguments, the Trainer, and the callbacks that report and stop it."""
    from transformers import AutoTokenizer

    from llmctl.config import stage_values, time_fitted
    from llmctl.modeling import count_parameters
    from llmctl.train import callbacks as cb
    from llmctl.train import build

    tcfg = cfg.train
    device, dtype = build.device_and_dtype(tcfg)
    if is_main and trackers.wanted(tcfg):
        trackers.start(trackers.wanted(tcfg), cfg, rd, resumed=resume is not None)
    processing = hooks.processor(rd.tokenizer_dir) if hooks.processor else AutoTokenizer.from_pretrained(rd.tokenizer_dir)
    tok = getattr(processing, "tokenizer", processing)
    train_ds, val_ds = build.load_splits(rd)
    val_ds = build.eval_subset(val_ds, tcfg)
    model = build.build_model(cfg, tok, hooks.build_model)
    n_params, n_trainable = count_parameters(model)
    con.info(f"model: {cfg.model.name_or_path or cfg.model.arch} {n_params / 1e6:.2f}M parameters ({n_trainable / 1e6:.2f}M trainable), device {device}, {str(dtype).replace('torch.', '')}")
    def args_for(cls=None, extra=None):
        return build.training_arguments(cfg, rd, device, dtype, val_ds is not None, con, is_main, cls, extra)

    plan = TimePlan(budget, kind=tcfg.scheduler, min_ratio=tcfg.min_lr_ratio, decay_fraction=tcfg.fit_decay_fraction,
                    eval_every=tcfg.eval_every if val_ds is not None else None, save_every=tcfg.save_every, resumed=resume is not None)
    run = cb.RunState()
    out = cb.Outputs(con, is_main, progress=con.progress("train", total=None, unit="steps") if is_main else nullcontext(),
                     metrics=open(rd.metrics_path, "a") if is_main else None, st=st, clock=budget.clock)
    time_plan = plan if time_fitted(tcfg) else None
    log_keys = hooks.log_keys
    probe = None
    if tcfg.method == "sft":
        collate = (hooks.collator or build.Collator)(tok.pad_token_id)
        trainer = build.make_trainer(hooks.trainer_class, time_plan, **hooks.trainer_kwargs, model=model, args=args_for(),
                                     train_dataset=train_ds, eval_dataset=val_ds, data_collator=collate, processing_class=processing)
    else:
        from llmctl.train import preference

        collate = None  # text pairs: TRL tokenizes and collates them; the first eval is skipped
        trainer = preference.make_trainer(cfg, model, tok, args_for, train_ds, val_ds, time_plan)
        log_keys = log_keys + preference.LOG_KEYS
        if is_main:
            probe = preference.ReferenceProbe(cfg, tok, val_ds if val_ds is not None else train_ds, "validation" if val_ds is not None else "train")
            probe.begin(trainer)
    metrics = cb.MetricsCallback(run, plan, budget, out, resumed=resume is not None, log_keys=log_keys, perplexity=tcfg.method == "sft")
    for callback in (
        metrics,
        cb.StopCallback(run, plan, budget, trainer.step_was_finite),
        cb.CheckpointCallback(run, plan, out, rd, fingerprint=resume_fingerprint(cfg, rd, hooks.identity),
                              config_values=stage_values(cfg, "train"), keep_last=tcfg.keep_last, keep_best=tcfg.keep_best),
        cb.TimingCallback(plan),  # after CheckpointCallback: a save's time includes the move into place
    ):
        trainer.add_callback(callback)
    return Training(trainer, model, tok, val_ds, collate, device, n_params, n_trainable, run, plan, budget, metrics, out, probe)


def _check_reference(t: Training, st, con, cfg) -> None:
    """After the last step: the reference must be the model training started from (a frozen copy
    that moved, or a LoRA base that did, would have measured the loss against something else).
    Recorded for eval, which compares the reference it rebuilds with the same log-probs."""
    from llmctl.train.distributed import world

    sharded = cfg.train.distributed == "fsdp" and world() > 1 and t.device.type != "cpu"  # one rank cannot run a sharded forward
    rec = t.probe.record(None if sharded else t.trainer)
    after = rec.get("after_training")
    if after is not None and not after["unchanged"]:
        con.warn(f"the reference model moved during training (log-probs differ by up to {after['max_abs_diff']} nats): "
                 "the preference loss was measured against a changing model")
    if st is not None:
        st.manifest["preference"]["reference_probe"] = rec
        st.save()


def loop(t: Training, resume: Path | None, batch_size: int) -> tuple[float | None, float | None]:
    """trainer.train() under our SIGTERM/SIGINT handlers: (the first val loss, the last), None where not measured."""
    old = {s: signal.signal(s, t.run.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with t.out.progress:
            init_val = _first_eval(t, batch_size) if resume is None and t.val_ds is not None and t.collate is not None else None
            t.trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            final_val = _last_eval(t)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        t.out.close()
    return init_val, final_val


def _first_eval(t: Training, batch_size: int) -> float:
    """The untrained model's val loss, logged as step 0."""
    from llmctl.train.build import eval_loss

    # Not trainer.evaluate(): called before train() under DDP it leaves the model
    # unwrapped and gradients are never all-reduced (seen with transformers 5.24).
    t_eval = t.budget.clock()
    val = eval_loss(t.model, t.val_ds, t.collate, batch_size)
    t.plan.times.eval_s = t.budget.clock() - t_eval  # the first plan's estimate of an eval's cost
    t.metrics.on_log(t.trainer.args, t.trainer.state, t.trainer.control, logs={"eval_loss": val})
    return val


def _last_eval(t: Training) -> float | None:
    """The val loss at the last step (evaluated now unless the last step was an eval step);
    None without a validation split or after a NaN or a signal."""
    if t.val_ds is None or t.run.nan_step is not None or t.run.signal is not None:
        return None
    val = t.run.val.get(t.trainer.state.global_step)
    return val if val is not None else t.trainer.evaluate()["eval_loss"]
