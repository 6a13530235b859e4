"""After `trainer.train()`: why it stopped, the result's numbers, the final model in RUN/train."""

from __future__ import annotations

import json
from pathlib import Path

from llmctl.errors import LlmctlError
from llmctl.rundir import RunDir, atomic_dir, replace_path
from llmctl.train.callbacks import RunState, ppl
from llmctl.train.checkpoints import complete_checkpoints, interrupted
from llmctl.train.distributed import barrier, shared_tmp, world
from llmctl.train.schedule import TimeBudget, TimePlan


def raise_if_stopped(run: RunState, rd: RunDir, resume_cmd: str) -> None:
    """A NaN stop fails (exit 1); a signal is an interruption (exit 128+signal) naming its resume."""
    if run.nan_step is not None:
        last = complete_checkpoints(rd)
        keep = f"; the last good checkpoint is {last[-1]}" if last else ""
        raise LlmctlError(f"loss became NaN/inf at step {run.nan_step}{keep}: lower train.lr or enable train.max_grad_norm")
    if run.signal is not None:
        raise interrupted(run.signal, rd, resume_cmd)


def read_metrics(rd: RunDir) -> list[dict]:
    if not rd.metrics_path.is_file():
        return []
    out = []
    for line in rd.metrics_path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by a kill
    return out


def summarize(state, run: RunState, plan: TimePlan, budget: TimeBudget, rd: RunDir, *, init_val: float | None,
              final_val: float | None, n_params: int, n_trainable: int, device, perplexity: bool = True) -> dict:
    """The result (and the manifest's headline): steps, why it stopped, losses, speed. `state`: the Trainer's.
    `perplexity` False (a preference loss): no *_ppl numbers."""
    history = read_metrics(rd)
    if init_val is None:  # a resumed run: the first process measured it
        init_val = next((r["val_loss"] for r in history if r.get("step") == 0 and "val_loss" in r), None)
    losses = [r["loss"] for r in history if "loss" in r]
    tps = [r["tokens_per_s"] for r in history if "tokens_per_s" in r]
    result = {
        "steps": state.global_step,
        "stopped_by": run.reason,
        "parameters": n_params,
        "trainable_parameters": n_trainable,
        "train_loss": round(losses[-1], 4) if losses else None,
        "init_val_loss": round(init_val, 4) if init_val is not None else None,
        "init_val_ppl": round(ppl(init_val), 3) if init_val is not None else None,
        "val_loss": round(final_val, 4) if final_val is not None else None,
        "val_ppl": round(ppl(final_val), 3) if final_val is not None else None,
        "tokens": int(state.num_input_tokens_seen),  # already summed over ranks
        "tokens_per_s": round(tps[-1], 1) if tps else None,
        "device": str(device),
        "world_size": world(),
        "seconds": round(budget.elapsed(), 1),
    }
    if not perplexity:
        del result["init_val_ppl"], result["val_ppl"]
    if plan.sched is not None:
        result["planned_steps"] = plan.planned_steps()  # the schedule's end, fitted to max_time
        result["sec_per_step"] = plan.sched.sec_per_step
    return result


def collective_save(trainer, final: Path, is_main: bool, extra=None) -> None:
    """`Trainer.save_model` on every rank into a temporary folder, then (rank 0) into place.

    Under FSDP the weights are sharded: gathering them is a collective that every rank must
    join, and only rank 0 writes. With DDP or one process it is a plain save.
    """
    tmp = shared_tmp(final, is_main)
    trainer.save_model(str(tmp))
    barrier()
    if is_main:
        (tmp / "training_args.bin").unlink(missing_ok=True)  # the Trainer's pickle, not the model's
        if extra is not None:
            extra(tmp)
        replace_path(tmp, final)
    barrier()


def save_final(trainer, tok, cfg, rd: RunDir, is_main: bool, build_model=None) -> None:
    """RUN/train/model (and RUN/train/adapter for LoRA): normal Hugging Face folders. Every rank
    calls it: under FSDP the save is collective."""
    from transformers import GenerationConfig

    gen = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if not cfg.model.lora.enabled:
        collective_save(trainer, rd.model_dir, is_main, extra=gen.save_pretrained)
        return
    # LoRA: the Trainer saves the adapter; the merged model is written by rank 0 alone.
    collective_save(trainer, rd.adapter_dir, is_main)
    if is_main:
        merged = _merged_lora(trainer, tok, cfg, rd, build_model)
        with atomic_dir(rd.model_dir) as tmp:
            merged.save_pretrained(tmp)
            (trainer.processing_class or tok).save_pretrained(tmp)  # the processor of an image-text model, else the tokenizer
            gen.save_pretrained(tmp)
    barrier()


def _merged_lora(trainer, tok, cfg, rd: RunDir, build_model=None):
    """The trained LoRA model with its adapter merged into the weights."""
    if getattr(trainer, "is_fsdp_enabled", False):
        # The in-memory weights are shards: merge the saved adapter into a fresh base.
        from peft import PeftModel

        from llmctl.train.build import base_model

        return PeftModel.from_pretrained(base_model(cfg, tok, build_model), rd.adapter_dir).merge_and_unload()
    return trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()


def report_to_trackers(rd: RunDir, manifest: dict, result: dict) -> None:
    """train.report_to: the config, the lineage and the final numbers, beside the Trainer's metrics."""
    import tempfile

    from llmctl.trackers import attach

    with tempfile.TemporaryDirectory() as tmp:
        lineage = Path(tmp) / "lineage.json"
        lineage.write_text(json.dumps({k: manifest.get(k) for k in ("id", "lineage", "config_values", "versions", "host")}, indent=2, default=str))
        attach(rd, {"config": rd.stage_dir("train") / "config.yaml", "lineage": lineage}, result)
