"""`llmctl train`: RUN/prepare -> RUN/train/model, resumable, under torchrun unchanged.

Built on the Hugging Face Trainer (AdamW, schedules, accumulation, DDP/FSDP, exact resume).
llmctl adds: step-NNNNNN checkpoints that appear atomically, automatic resume with a
safety check, SIGTERM/SIGINT -> checkpoint -> exit 143/130, a wall-clock budget, NaN stop,
metrics.jsonl, progress, and rank-0-only writing.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmctl import console as _console
from llmctl.checks import check_export_formats
from llmctl.config import parse_duration, time_fitted  # noqa: F401  (train.parse_duration, as before)
from llmctl.errors import ConfigError, Interrupted, LlmctlError
from llmctl.rundir import RunDir, _tmp_name, atomic_dir, atomic_write_json, replace_path

META = "llmctl.json"  # written into each checkpoint: what it continues
STEP_RE = re.compile(r"^step-(\d{6,})$")


# --------------------------------------------------------------------------- hooks
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


# --------------------------------------------------------------------------- helpers
def complete_checkpoints(rd: RunDir) -> list[Path]:
    d = rd.checkpoints_dir
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := STEP_RE.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def train_seed(cfg) -> int:
    return cfg.train.seed if cfg.train.seed is not None else cfg.run.seed


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _resume_fingerprint(cfg, rd: RunDir, hooks: Hooks | None = None) -> dict:
    """What a checkpoint must share with the current run to be continued safely."""
    fp = {
        "model": cfg.section_hash("model"),
        "data": (rd.manifest("prepare") or {}).get("id"),
        "micro_batch_size": cfg.train.micro_batch_size,
        "grad_accum": cfg.train.grad_accum,
        "world_size": _world(),
        "seed": train_seed(cfg),
    }
    if hooks is not None and hooks.identity is not None:
        fp["distill"] = hooks.identity  # only when set: plain train checkpoints keep their fingerprint
    return fp


def _launch_torchrun(nproc: int, rd: RunDir, resume_cmd: str) -> None:
    """`llmctl train CONFIG --nproc N`: run this same command as N ranks under torchrun.

    torchrun's own launcher runs in this process, so its outcome is ours to report: the
    ranks' exit codes, and Ctrl-C/SIGTERM (forwarded to every rank, which saves a
    checkpoint) as exit 130/143 with one line, not torchrun's traceback. Ranks print no
    result (LLMCTL_TORCHRUN=1): the caller reports rank 0's from the train manifest.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run as torchrun

    argv = list(sys.argv[1:])
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    # A rank saving a checkpoint after the signal gets this long before it is killed.
    targs = ["--standalone", f"--nproc-per-node={nproc}", "--shutdown-timeout=600", "-m", "llmctl", *out]
    _console.current().info("launching: torchrun " + " ".join(targs))
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):  # its notices would interleave with ours
            logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets, without its banner
    old_env = os.environ.get("LLMCTL_TORCHRUN")
    os.environ["LLMCTL_TORCHRUN"] = "1"
    try:
        torchrun(parse_args(targs))
    except SignalException as e:
        raise _interrupted(e.sigval, rd, resume_cmd) from None
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in sorted(e.failures.items())}
        first = next(iter(codes.values()))
        err = LlmctlError(f"train: rank(s) {', '.join(f'{r} (exit {c})' for r, c in codes.items())} failed; see the ranks' messages above")
        err.exit_code = first if first in (2, 3, 130, 143) else 1
        raise err from None
    finally:
        if old_env is None:
            os.environ.pop("LLMCTL_TORCHRUN", None)
        else:
            os.environ["LLMCTL_TORCHRUN"] = old_env


def _resume_command(cfg, rd: RunDir, hooks: Hooks, nproc: int) -> str:
    """The command that continues this run from its last checkpoint: the same config, --set flags,
    run directory and process count (a checkpoint resumes only on the same world size); no --force."""
    from llmctl.hints import command

    return command(hooks.name, cfg, rd.root, *(["--nproc", str(nproc)] if nproc != cfg.train.nproc else []))


def _interrupted(signum: int, rd: RunDir, resume_cmd: str) -> Interrupted:
    """Interrupted (exit 128+signum) naming the checkpoint it saved and the command that resumes it."""
    name = signal.Signals(signum).name
    last = complete_checkpoints(rd)
    if not last:
        return Interrupted(signum, f"interrupted by {name} before the first checkpoint: run '{resume_cmd}' to start again", hint=resume_cmd)
    step = int(STEP_RE.match(last[-1].name).group(1))
    return Interrupted(signum, f"interrupted by {name}: saved {last[-1]}; run '{resume_cmd}' to resume from step {step}",
                       hint=resume_cmd, result={"step": step, "checkpoint": str(last[-1])})


def collective_device(backend: str):
    """Where a collective's tensors must live for a process-group backend.

    NCCL only takes CUDA tensors (a CPU tensor fails), gloo only CPU ones; a combined
    backend like 'cpu:gloo,cuda:nccl' takes CPU tensors.
    """
    import torch

    b = str(backend).lower()
    if "cpu:gloo" in b:
        return torch.device("cpu")
    if "nccl" in b:
        return torch.device("cuda", torch.cuda.current_device())
    if "xccl" in b:
        return torch.device("xpu", torch.xpu.current_device())
    return torch.device("cpu")


def agree_any(flag: bool) -> bool:
    """True on every rank if it is true on any (a stop every rank takes at the same step)."""
    if _world() == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=collective_device(dist.get_backend()))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# --------------------------------------------------------------------------- time-fitted schedule
class TimeFittedSchedule:
    """The lr multiplier of a warmup + cosine (to `min_ratio`) or linear (to 0) schedule whose end,
    `total`, is planned while training so that the decay ends when the time budget does.

    The Trainer's `cosine_with_min_lr` and `linear` curves, shifted one step so that the last
    planned step itself trains at the floor, and held there past `total`. As a LambdaLR's lambda its __dict__ (plain numbers) is saved in the checkpoint's
    scheduler.pt and restored on resume, so a resumed run keeps the planned schedule exactly.
    `plan` (a per-run class attribute, never saved) may move `total` before each value.
    """

    plan = None

    def __init__(self, kind: str, warmup: int, total: int, min_ratio: float, decay_fraction: float = 1.0):
        self.kind, self.warmup, self.total, self.min_ratio = kind, int(warmup), int(total), float(min_ratio)
        self.decay_fraction = float(decay_fraction)
        self.planned = False  # True once `total` was fitted to the budget
        self.sec_per_step = None  # the measured cost of one step the plan used (evals and saves included)

    def __call__(self, step: int) -> float:
        if type(self).plan is not None:
            type(self).plan(self, step)
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


# --------------------------------------------------------------------------- collator
class Collator:
    """Pads variable-length rows (pad id, labels -100); fixed-length rows stack as they are."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        n = max(len(r["input_ids"]) for r in rows)
        if all(len(r["input_ids"]) == n for r in rows):  # packed text: no padding, just stack
            ids = torch.stack([torch.as_tensor(r["input_ids"], dtype=torch.long) for r in rows])
            labels = torch.stack([torch.as_tensor(r["labels"], dtype=torch.long) for r in rows])
            return {"input_ids": ids, "labels": labels}
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.as_tensor(r["input_ids"])
            labels[i, :k] = torch.as_tensor(r["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# --------------------------------------------------------------------------- the stage
def run(cfg, rd: RunDir, *, force: bool = False, nproc: int | None = None, hooks: Hooks | None = None, **_) -> dict:
    hooks = hooks or Hooks()
    if hooks.name == "train" and getattr(cfg, "distill", None) is not None:
        from llmctl.hints import command

        raise ConfigError(f"{cfg.source} has a distill section: run '{command('distill', cfg, rd.root)}' (or remove the section to train without a teacher)")
    con = _console.current()
    nproc = nproc or cfg.train.nproc
    under_torchrun = "LOCAL_RANK" in os.environ
    is_main = _rank() == 0
    rd.require("prepare", cfg)
    if not force and rd.up_to_date("train", cfg, extra_hash=hooks.identity):
        con.info(f"{hooks.name}: up to date in {rd.stage_dir('train')} (use --force to redo)")
        return {**rd.manifest("train")["headline"], "cached": True}
    max_time = parse_duration(cfg.train.max_time)
    if not force:
        # Refuse before anything is touched: the record must keep describing what is there.
        _refuse_changed_finished_run(cfg, rd, hooks)
        _pick_resume(cfg, rd, None, hooks)
    resume_cmd = _resume_command(cfg, rd, hooks, nproc)
    if nproc > 1 and not under_torchrun:
        _launch_torchrun(nproc, rd, resume_cmd)
        return rd.manifest("train")["headline"]  # rank 0's result

    ctx = rd.begin("train", cfg, inputs=["prepare"], extra_hash=hooks.identity) if is_main else nullcontext()
    with ctx as st:
        if st is not None and hooks.manifest:
            st.manifest.update(hooks.manifest)
            st.save()
        # Under the lock: a second `--force` cannot wipe the checkpoints of a running job.
        if force and is_main:
            for p in (rd.checkpoints_dir, rd.model_dir, rd.adapter_dir, rd.metrics_path):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        if _world() > 1:
            # The same shared state TrainingArguments builds (gloo on CPU, nccl on GPU): creating it
            # ourselves first would otherwise leave the Trainer thinking it runs alone.
            import torch.distributed as dist
            from accelerate import PartialState

            from llmctl.modeling import pick_device

            PartialState(cpu=pick_device(cfg.train.device).type == "cpu")
            dist.barrier()  # ranks > 0 wait for rank 0's clean-up

        resume = _pick_resume(cfg, rd, con, hooks)
        result = _train(cfg, rd, st, resume, max_time, con, is_main, hooks, resume_cmd)
        result.update(hooks.headline)
        if st is not None:
            st.headline.update(result)
    return result


def _refuse_changed_finished_run(cfg, rd: RunDir, hooks: Hooks) -> None:
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


def _pick_resume(cfg, rd: RunDir, con, hooks: Hooks | None = None) -> Path | None:
    """The last complete checkpoint, if it continues this config; ConfigError if it cannot.

    `con=None` only checks. A checkpoint continues the run only when every key that changes
    the result is the same: the Trainer restores the optimizer and schedule from the checkpoint,
    so a new lr (say) would be silently ignored while the record claimed it.
    """
    from llmctl.config import show_value, stage_values, value_changes

    ckpts = complete_checkpoints(rd)
    if not ckpts:
        return None
    last = ckpts[-1]
    meta = json.loads((last / META).read_text())
    want = _resume_fingerprint(cfg, rd, hooks)
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


def _train(cfg, rd: RunDir, st, resume: Path | None, max_time: float | None, con, is_main: bool, hooks: Hooks | None = None,
           resume_cmd: str = "") -> dict:
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from llmctl.modeling import (
        apply_lora,
        build_from_scratch,
        count_parameters,
        load_pretrained_for_training,
        pick_device,
        pick_dtype,
    )

    hooks = hooks or Hooks()
    t0 = time.time()
    tcfg = cfg.train
    device = pick_device(tcfg.device)
    dtype = pick_dtype(tcfg.precision, device)
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("train.precision: fp16 needs a GPU; use auto, fp32 or bf16 on CPU")
    tok = AutoTokenizer.from_pretrained(rd.tokenizer_dir)
    ds = load_from_disk(str(rd.dataset_dir))
    train_ds = ds["train"].with_format("torch")  # rows arrive as tensors: no Python lists per step
    val_ds = ds["validation"].with_format("torch") if "validation" in ds else None
    if val_ds is not None and tcfg.eval_batches:
        # A fixed subset sized by the global batch, so 2 ranks x 2 and 1 rank x 4 see the same rows.
        val_ds = val_ds.select(range(min(len(val_ds), tcfg.eval_batches * tcfg.micro_batch_size * _world())))

    # ---- model
    if hooks.build_model is not None:
        model = hooks.build_model(cfg, tok)
    elif cfg.model.name_or_path:
        if cfg.tokenizer.name_or_path is None:
            raise ConfigError(
                "model.name_or_path is a pretrained model but prepare trained a new tokenizer: its token ids mean nothing "
                "to the model. Set tokenizer.name_or_path to the model's tokenizer and re-run prepare"
            )
        model = load_pretrained_for_training(cfg, tok, torch.float32)  # master weights fp32; autocast does bf16
    else:
        model = build_from_scratch(cfg, tok)
    # A hub model's architecture may only be known now: refuse an impossible export before training.
    check_export_formats(cfg.export.formats, model.config.model_type, f"model.name_or_path ({cfg.model.name_or_path})" if cfg.model.name_or_path else "model.arch")
    if cfg.model.lora.enabled:
        model = apply_lora(model, cfg)
    n_params, n_trainable = count_parameters(model)
    con.info(f"model: {cfg.model.name_or_path or cfg.model.arch} {n_params / 1e6:.2f}M parameters ({n_trainable / 1e6:.2f}M trainable), device {device}, {str(dtype).replace('torch.', '')}")

    # ---- arguments
    sched = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}[tcfg.scheduler]
    kwargs = {"min_lr_rate": tcfg.min_lr_ratio} if tcfg.scheduler == "cosine" else {}
    fsdp = {}
    if tcfg.distributed == "fsdp" and _world() > 1:
        if device.type == "cpu" and is_main:
            # accelerate only shards on accelerators; on CPU the same run is plain DDP.
            con.warn("train.distributed=fsdp: accelerate does not shard on CPU, so these ranks run as DDP (full weights on each)")
        fsdp = {"fsdp": "full_shard auto_wrap", "fsdp_config": {"use_orig_params": True, "state_dict_type": "FULL_STATE_DICT"}}
    if tcfg.tensorboard:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(rd.stage_dir("train") / "tensorboard"))
    args = TrainingArguments(
        output_dir=str(rd.checkpoints_dir),
        max_steps=tcfg.max_steps if tcfg.max_steps else -1,
        num_train_epochs=tcfg.epochs or 1.0,
        per_device_train_batch_size=tcfg.micro_batch_size,
        per_device_eval_batch_size=tcfg.micro_batch_size,
        gradient_accumulation_steps=tcfg.grad_accum,
        learning_rate=tcfg.lr,
        weight_decay=tcfg.weight_decay,
        adam_beta1=tcfg.beta1,
        adam_beta2=tcfg.beta2,
        max_grad_norm=tcfg.max_grad_norm or 0.0,
        lr_scheduler_type=sched,
        lr_scheduler_kwargs=kwargs,
        warmup_steps=tcfg.warmup_steps,
        logging_steps=tcfg.log_every,
        eval_strategy="steps" if val_ds is not None else "no",
        eval_steps=tcfg.eval_every,
        save_strategy="steps",
        save_steps=tcfg.save_every,
        save_total_limit=None,
        seed=train_seed(cfg),
        data_seed=train_seed(cfg),
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device.type == "cpu",
        activation_checkpointing=tcfg.gradient_checkpointing,
        torch_compile=tcfg.compile,
        dataloader_num_workers=tcfg.num_workers,
        ddp_find_unused_parameters=False,
        report_to=["tensorboard"] if tcfg.tensorboard else [],
        disable_tqdm=True,
        include_num_input_tokens_seen=True,
        logging_nan_inf_filter=False,  # a NaN loss must be seen, not averaged away
        remove_unused_columns=False,
        **fsdp,
    )

    # ---- a schedule fitted to the time budget
    fit = time_fitted(tcfg)  # the same rule that makes max_time a result key
    fitted: dict[str, Any] = {"sched": None}  # the TimeFittedSchedule, once the Trainer made it
    # Seconds measured while training: the window [t_a, now] of steps s_a..step, minus the evals
    # and saves inside it (they are planned separately, per eval_every/save_every steps).
    timing: dict[str, Any] = {"start": None, "s_a": None, "t_a": None, "excluded": 0.0, "eval_s": 0.0, "save_s": 0.0, "t_mark": None}
    replan = {"on": resume is None}  # a resumed run keeps the schedule its checkpoint planned

    def plan(sched: TimeFittedSchedule, step: int) -> None:
        if timing["start"] is None:  # the LambdaLR's first value, before a checkpoint's state is loaded
            timing["start"] = step
            return
        if not replan["on"]:
            if sched.planned:
                return
            replan["on"] = True  # resumed from a checkpoint written before any plan: plan from here
            timing["start"] = step
            return
        now = time.time()
        if timing["s_a"] is None:
            if step >= timing["start"] + 2:  # the first steps carry one-time costs
                timing["s_a"], timing["t_a"], timing["excluded"] = step, now, 0.0
            return
        if step < max(sched.warmup, timing["s_a"] + 5):
            return
        if sched.planned and sched.total - step <= max(3, sched.total // 50):
            return  # the end is near and fixed: the steps left were given their lrs, down to the floor
        per_step = max(now - timing["t_a"] - timing["excluded"], 1e-9) / (step - timing["s_a"])
        per_step += timing["eval_s"] / tcfg.eval_every if val_ds is not None else 0.0
        per_step += timing["save_s"] / tcfg.save_every
        left = max_time - (now - t0) - 2 * per_step  # two steps in reserve for the machine's jitter
        n = max(0, int(left / per_step))
        if _world() > 1:  # every rank must agree on the schedule: the most cautious plan wins
            import torch.distributed as dist

            t = torch.tensor([float(n)], device=collective_device(dist.get_backend()))
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            n = int(t.item())
        sched.total = max(step, min(sched.cap, step + n))
        sched.planned, sched.sec_per_step = True, round(per_step, 6)

    # ---- callbacks
    stop = {"signal": None, "reason": "max_steps", "nan_step": None}
    fingerprint = _resume_fingerprint(cfg, rd, hooks)
    from llmctl.config import stage_values

    config_values = stage_values(cfg, "train")
    metrics_f = open(rd.metrics_path, "a") if is_main else None
    progress = con.progress("train", total=None, unit="steps") if is_main else nullcontext()

    def on_signal(signum, frame):
        stop["signal"] = signum

    class LlmctlCallback(TrainerCallback):
        def __init__(self):
            self.t_start = time.time()
            self.tokens_at_start = None
            self.val = {}

        def on_train_begin(self, args, state, control, **kw):
            # A resumed Trainer takes the log/eval/save cadence from the checkpoint's state; the
            # config may change them on resume (they never change the result), so apply ours.
            state.compute_steps(args, state.max_steps)
            self.t_start = time.time()
            self.tokens_at_start = state.num_input_tokens_seen
            if is_main:
                progress.total = state.max_steps
                progress.update(completed=state.global_step)
            _record_progress(st, state.global_step, state.max_steps, checkpoint=state.global_step if resume else None)

        def on_step_end(self, args, state, control, **kw):
            # Every step, not only log steps: a checkpoint saved after a NaN must never exist.
            if agree_any(not trainer.step_was_finite()):
                stop["nan_step"] = state.global_step
                control.should_save = False
                control.should_training_stop = True
                return control
            out_of_time = max_time is not None and time.time() - t0 >= max_time
            fs = fitted["sched"]
            if fs is not None and fs.planned and state.global_step >= fs.total and state.global_step < state.max_steps:
                out_of_time = True  # the schedule planned for the budget has ended (same on every rank)
            timing["t_mark"] = time.time()
            if agree_any(stop["signal"] is not None or out_of_time):
                if stop["signal"] is None:
                    stop["reason"] = "max_time"
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            rec = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "elapsed_s": round(time.time() - t0, 2)}
            if "loss" in logs:
                loss = float(logs["loss"])
                gn = logs.get("grad_norm")
                if not math.isfinite(loss) or (gn is not None and not math.isfinite(float(gn))):
                    stop["nan_step"] = state.global_step
                    control.should_training_stop = True
                    control.should_save = False
                el = max(time.time() - self.t_start, 1e-9)
                tps = (state.num_input_tokens_seen - (self.tokens_at_start or 0)) / el
                rec.update(loss=loss, lr=float(logs.get("learning_rate", 0.0)), grad_norm=_f(logs.get("grad_norm")), tokens=int(state.num_input_tokens_seen), tokens_per_s=round(tps, 1))
                rec.update({k: float(logs[k]) for k in hooks.log_keys if k in logs})
                if fitted["sched"] is not None and fitted["sched"].planned:
                    rec["planned_steps"] = fitted["sched"].total
                    if is_main:
                        progress.total = fitted["sched"].total  # the bar and its ETA follow the plan
                if is_main:
                    progress.update(completed=state.global_step, loss=loss, lr=rec["lr"], tok_s=round(tps))
            if "eval_loss" in logs:
                vl = float(logs["eval_loss"])
                self.val[state.global_step] = vl
                rec.update(val_loss=vl, val_ppl=_ppl(vl))
                if is_main:
                    con.info(f"step {state.global_step}: val_loss {vl:.4f}  val_ppl {_ppl(vl):.2f}")
            if len(rec) > 3 and metrics_f is not None:
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
            _record_progress(st, state.global_step, state.max_steps, every=10.0)
            return control

        def _took(self, key: str) -> None:
            # An eval or a save just ended: its duration, kept out of the per-step time.
            now = time.time()
            if timing["t_mark"] is not None:
                timing[key] = now - timing["t_mark"]
                if timing["t_a"] is not None:
                    timing["excluded"] += timing[key]
            timing["t_mark"] = now

        def on_evaluate(self, args, state, control, **kw):
            self._took("eval_s")
            return control

        def on_save(self, args, state, control, **kw):
            # The Trainer finished writing checkpoint-N: stamp it and move it into place.
            if _world() > 1:
                import torch.distributed as dist

                dist.barrier()
            if is_main:
                src = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if src.is_dir():
                    meta = {"step": state.global_step, "fingerprint": fingerprint, "config_values": config_values, "val_loss": self.val.get(state.global_step)}
                    if fitted["sched"] is not None:
                        meta["planned_steps"] = fitted["sched"].total if fitted["sched"].planned else None
                    atomic_write_json(src / META, meta)
                    dst = rd.checkpoint_dir(state.global_step)
                    if dst.exists():
                        shutil.rmtree(dst)
                    os.replace(src, dst)
                    _rotate(rd, tcfg.keep_last, tcfg.keep_best)
                    _record_progress(st, state.global_step, state.max_steps, checkpoint=state.global_step)
                    if os.environ.get("LLMCTL_FAULT_KILL_AFTER_SAVE") == str(state.global_step):
                        os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the resume tests
            if _world() > 1:
                import torch.distributed as dist

                dist.barrier()
            self._took("save_s")
            return control

    class CheckedTrainer(hooks.trainer_class or Trainer):
        """The Trainer, remembering whether this step's losses and gradient norm were finite."""

        _finite = None

        def training_step(self, *a, **kw):
            loss = super().training_step(*a, **kw)
            ok = torch.isfinite(loss.detach()).all()
            self._finite = ok if self._finite is None else self._finite & ok
            return loss

        def _get_grad_norm(self, *a, **kw):
            gn = super()._get_grad_norm(*a, **kw)
            if gn is not None:
                ok = torch.isfinite(torch.as_tensor(gn)).all()
                self._finite = ok if self._finite is None else self._finite & ok.to(self._finite.device)
            return gn

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if not fit or self.lr_scheduler is not None:
                return super().create_scheduler(num_training_steps, optimizer)
            from torch.optim.lr_scheduler import LambdaLR

            cls = type("PlannedSchedule", (TimeFittedSchedule,), {"plan": staticmethod(plan)})
            sched = cls(tcfg.scheduler, self.args.get_warmup_steps(num_training_steps), num_training_steps, tcfg.min_lr_ratio,
                        tcfg.fit_decay_fraction)
            type(sched).cap = num_training_steps  # the upper bound (max_steps); class-level: not in the saved state
            fitted["sched"] = sched
            self.lr_scheduler = LambdaLR(optimizer if optimizer is not None else self.optimizer, sched)
            self._created_lr_scheduler = True
            return self.lr_scheduler

        def step_was_finite(self) -> bool:
            ok, self._finite = self._finite, None
            return True if ok is None else bool(ok.item())  # one sync per optimizer step

    callback = LlmctlCallback()
    trainer = CheckedTrainer(
        **hooks.trainer_kwargs,
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=Collator(tok.pad_token_id),
        processing_class=tok,
        callbacks=[callback],
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):  # our own progress and metrics replace these
        trainer.remove_callback(cb)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with progress:
            init_val = None
            if resume is None and val_ds is not None:
                # Not trainer.evaluate(): called before train() under DDP it leaves the model
                # unwrapped and gradients are never all-reduced (seen with transformers 5.24).
                t_eval = time.time()
                init_val = _eval_loss(model, val_ds, Collator(tok.pad_token_id), tcfg.micro_batch_size)
                timing["eval_s"] = time.time() - t_eval  # the first plan's estimate of an eval's cost
                callback.on_log(args, trainer.state, trainer.control, logs={"eval_loss": init_val})
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            state = trainer.state
            final_val = None
            if val_ds is not None and stop["nan_step"] is None and stop["signal"] is None:
                final_val = callback.val.get(state.global_step)
                if final_val is None:
                    final_val = trainer.evaluate()["eval_loss"]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if metrics_f is not None:
            metrics_f.close()
    if stop["nan_step"] is not None:
        last = complete_checkpoints(rd)
        keep = f"; the last good checkpoint is {last[-1]}" if last else ""
        raise LlmctlError(f"loss became NaN/inf at step {stop['nan_step']}{keep}: lower train.lr or enable train.max_grad_norm")
    if stop["signal"] is not None:
        raise _interrupted(stop["signal"], rd, resume_cmd)

    # ---- final model
    history = _read_metrics(rd)
    if init_val is None:
        init_val = next((r["val_loss"] for r in history if r.get("step") == 0 and "val_loss" in r), None)
    losses = [r["loss"] for r in history if "loss" in r]
    tps = [r["tokens_per_s"] for r in history if "tokens_per_s" in r]
    result = {
        "steps": state.global_step,
        "stopped_by": stop["reason"],
        "parameters": n_params,
        "trainable_parameters": n_trainable,
        "train_loss": round(losses[-1], 4) if losses else None,
        "init_val_loss": round(init_val, 4) if init_val is not None else None,
        "init_val_ppl": round(_ppl(init_val), 3) if init_val is not None else None,
        "val_loss": round(final_val, 4) if final_val is not None else None,
        "val_ppl": round(_ppl(final_val), 3) if final_val is not None else None,
        "tokens": int(state.num_input_tokens_seen),  # already summed over ranks
        "tokens_per_s": round(tps[-1], 1) if tps else None,
        "device": str(device),
        "world_size": _world(),
        "seconds": round(time.time() - t0, 1),
    }
    if fitted["sched"] is not None:
        fs = fitted["sched"]
        result["planned_steps"] = fs.total if fs.planned else None  # the schedule's end, fitted to max_time
        result["sec_per_step"] = fs.sec_per_step
    _save_final(trainer, tok, cfg, rd, is_main, hooks.build_model)  # every rank: under FSDP the save is collective
    if st is not None:
        st.manifest["device"] = str(device)
    return result


def _record_progress(st, step: int, total: int, checkpoint: int | None = None, every: float = 0.0) -> None:
    """The step reached, of how many, and the last checkpoint (where a re-run resumes) in the
    train manifest, for `llmctl status`: running at step N/M, or interrupted at step N/M.
    `every`: write at most that often (seconds); a checkpoint is always written."""
    if st is None:  # ranks > 0 write nothing shared
        return
    prog = st.manifest.setdefault("progress", {})
    now = time.time()
    if checkpoint is None and now - prog.get("time", 0.0) < every:
        return
    prog.setdefault("first_step", int(step))  # where this process began (0, or the step it resumed from): for the ETA
    prog.update(step=int(step), total=int(total) if total and total > 0 else None, time=round(now, 3))
    if checkpoint is not None:
        prog["checkpoint_step"] = int(checkpoint)
    st.save()


def _eval_loss(model, ds, collate, batch_size: int) -> float:
    """Mean of per-batch mean losses, as Trainer.evaluate reports it."""
    import torch

    device = next(model.parameters()).device  # where the Trainer put it (FSDP leaves it in place)

    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            batch = {k: v.to(device) for k, v in collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))]).items()}
            losses.append(model(**batch).loss.float().item())
    model.train(was_training)
    return sum(losses) / max(len(losses), 1)


def _f(v):
    return None if v is None else float(v)


def _ppl(loss: float | None) -> float:
    return math.exp(min(loss, 50.0)) if loss is not None else float("nan")


def _read_metrics(rd: RunDir) -> list[dict]:
    if not rd.metrics_path.is_file():
        return []
    out = []
    for line in rd.metrics_path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by a kill
    return out


def _rotate(rd: RunDir, keep_last: int, keep_best: bool) -> None:
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


def _barrier() -> None:
    if _world() > 1:
        import torch.distributed as dist

        dist.barrier()


def _shared_tmp(path: Path, is_main: bool) -> Path:
    """A temporary folder next to `path`, named by rank 0 and known to every rank."""
    name = [str(_tmp_name(path))] if is_main else [None]
    if _world() > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def _collective_save(trainer, final: Path, is_main: bool, extra=None) -> None:
    """`Trainer.save_model` on every rank into a temporary folder, then (rank 0) into place.

    Under FSDP the weights are sharded: gathering them is a collective that every rank must
    join, and only rank 0 writes. With DDP or one process it is a plain save.
    """
    tmp = _shared_tmp(final, is_main)
    trainer.save_model(str(tmp))
    _barrier()
    if is_main:
        (tmp / "training_args.bin").unlink(missing_ok=True)  # the Trainer's pickle, not the model's
        if extra is not None:
            extra(tmp)
        replace_path(tmp, final)
    _barrier()


def _save_final(trainer, tok, cfg, rd: RunDir, is_main: bool, build_model=None) -> None:
    """RUN/train/model (and RUN/train/adapter for LoRA): normal Hugging Face folders."""
    from transformers import GenerationConfig

    gen = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if not cfg.model.lora.enabled:
        _collective_save(trainer, rd.model_dir, is_main, extra=gen.save_pretrained)
        return
    # LoRA: the Trainer saves the adapter; the merged model is written by rank 0 alone.
    _collective_save(trainer, rd.adapter_dir, is_main)
    if is_main:
        if getattr(trainer, "is_fsdp_enabled", False):
            # The in-memory weights are shards: merge the saved adapter into a fresh base.
            import torch
            from peft import PeftModel

            from llmctl.modeling import build_from_scratch, load_pretrained_for_training

            if build_model is not None:
                base = build_model(cfg, tok)
            elif cfg.model.name_or_path:
                base = load_pretrained_for_training(cfg, tok, torch.float32)
            else:
                base = build_from_scratch(cfg, tok)
            merged = PeftModel.from_pretrained(base, rd.adapter_dir).merge_and_unload()
        else:
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        with atomic_dir(rd.model_dir) as tmp:
            merged.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            gen.save_pretrained(tmp)
    _barrier()
