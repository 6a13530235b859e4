"""Everything training starts from: device and dtype, data, model, TrainingArguments, the Trainer.

Each piece is a function of the config and the run directory; `stage.setup` calls them in order.
"""

from __future__ import annotations

from typing import Any, Callable

from llmctl.checks import check_export_formats
from llmctl.errors import ConfigError
from llmctl.rundir import RunDir
from llmctl.train.checkpoints import train_seed
from llmctl.train.distributed import world
from llmctl.trackers import wanted


class Collator:
    """Pads variable-length rows (pad id, labels -100); fixed-length rows stack as they are."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        # Other per-row inputs stack as they are (image-text rows have their own collator: llmctl.vision.infer.Collator).
        extra = {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0] if k not in ("input_ids", "labels")}
        n = max(len(r["input_ids"]) for r in rows)
        if all(len(r["input_ids"]) == n for r in rows):  # packed text: no padding, just stack
            ids = torch.stack([torch.as_tensor(r["input_ids"], dtype=torch.long) for r in rows])
            labels = torch.stack([torch.as_tensor(r["labels"], dtype=torch.long) for r in rows])
            return {"input_ids": ids, "labels": labels, **extra}
        from llmctl.data.formats import pad_right

        ids, labels, mask = pad_right(rows, self.pad_id)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, **extra}


def device_and_dtype(tcfg):
    """The device train.device picks and the dtype train.precision means on it."""
    import torch

    from llmctl.modeling import pick_device, pick_dtype

    device = pick_device(tcfg.device)
    dtype = pick_dtype(tcfg.precision, device)
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("train.precision: fp16 needs a GPU; use auto, fp32 or bf16 on CPU")
    return device, dtype


def slow_bf16(device, dtype) -> bool:
    """True where bf16 matmuls on this CPU fall back to torch's plain loops: oneDNN runs them
    natively or emulated only with AVX-512. Measured on a 2-core AVX2 machine: a 1024 x 768 x 2048
    bf16 matmul took 7.7 s against 0.064 s in float32, and an 85M model trained at 2 tokens/s
    against 104-132 in float32."""
    import torch

    return device.type == "cpu" and dtype == torch.bfloat16 and native_bf16() is False


def native_bf16() -> bool | None:
    """Whether oneDNN does bf16 on this CPU (torch's own probe); None where torch has no probe."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def load_splits(rd: RunDir):
    """(train, validation or None) of RUN/prepare's dataset, rows as tensors: no Python lists per step."""
    from datasets import load_from_disk

    ds = load_from_disk(str(rd.dataset_dir))
    train_ds = ds["train"].with_format("torch")
    val_ds = ds["validation"].with_format("torch") if "validation" in ds else None
    return train_ds, val_ds


def eval_subset(val_ds, tcfg):
    """A fixed subset sized by the global batch, so 2 ranks x 2 and 1 rank x 4 see the same rows."""
    if val_ds is None or not tcfg.eval_batches:
        return val_ds
    return val_ds.select(range(min(len(val_ds), tcfg.eval_batches * tcfg.micro_batch_size * world())))


def base_model(cfg, tok, build: Callable[[Any, Any], Any] | None = None):
    """The model before LoRA: `build(cfg, tok)` (distill's student), the pretrained model, or a new one."""
    import torch

    from llmctl.modeling import build_from_scratch, load_pretrained_for_training

    if build is not None:
        return build(cfg, tok)
    if cfg.model.name_or_path:
        if cfg.tokenizer.name_or_path is None:
            raise ConfigError(
                "model.name_or_path is a pretrained model but prepare trained a new tokenizer: its token ids mean nothing "
                "to the model. Set tokenizer.name_or_path to the model's tokenizer and re-run prepare"
            )
        return load_pretrained_for_training(cfg, tok, torch.float32)  # master weights fp32; autocast does bf16
    return build_from_scratch(cfg, tok)


def build_model(cfg, tok, build=None):
    """The model to train (LoRA applied), after refusing an export it could never make."""
    from llmctl.modeling import apply_lora

    model = base_model(cfg, tok, build)
    # A hub model's architecture may only be known now: refuse an impossible export before training.
    if cfg.data.format != "image_text":
        check_export_formats(cfg.export.formats, model.config.model_type, f"model.name_or_path ({cfg.model.name_or_path})" if cfg.model.name_or_path else "model.arch")
    elif "gguf" in cfg.export.formats:  # llama.cpp's model + mmproj: what the model alone decides
        from llmctl.export_support import check_image_text_model_config

        check_image_text_model_config(model.config)
    if cfg.model.lora.enabled:
        model = apply_lora(model, cfg)
    return model


def training_arguments(cfg, rd: RunDir, device, dtype, has_val: bool, con, is_main: bool, cls=None, extra: dict | None = None):
    """train.* as the Trainer's TrainingArguments; checkpoint-N folders go to RUN/train/checkpoints.
    `cls`: a subclass to build instead (TRL's DPOConfig...), with its own keys in `extra`."""
    import torch
    from transformers import TrainingArguments

    tcfg = cfg.train
    sched = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}[tcfg.scheduler]
    kwargs = {"min_lr_rate": tcfg.min_lr_ratio} if tcfg.scheduler == "cosine" else {}
    if is_main and slow_bf16(device, dtype):
        con.warn("train.precision: bf16 on this CPU runs every matmul in torch's slow fallback (no AVX-512 for oneDNN's bf16), "
                 "tens of times slower than fp32; set train.precision: fp32 (or auto)")
    fsdp = {}
    if tcfg.distributed == "fsdp" and world() > 1:
        if device.type == "cpu" and is_main:
            # accelerate only shards on accelerators; on CPU the same run is plain DDP.
            con.warn("train.distributed=fsdp: accelerate does not shard on CPU, so these ranks run as DDP (full weights on each)")
        fsdp = {"fsdp": "full_shard auto_wrap", "fsdp_config": {"use_orig_params": True, "state_dict_type": "FULL_STATE_DICT"}}
    return (cls or TrainingArguments)(
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
        eval_strategy="steps" if has_val else "no",
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
        # An image-text model has weights its loss never reaches (LLaVA reads the tower's last hidden
        # states, not CLIP's post_layernorm): DDP must look for them or it stops at the first step.
        ddp_find_unused_parameters=cfg.data.format == "image_text",
        report_to=wanted(tcfg),  # the Trainer's integrations; llmctl.trackers.start pointed them at the run
        disable_tqdm=True,
        include_num_input_tokens_seen=True,
        logging_nan_inf_filter=False,  # a NaN loss must be seen, not averaged away
        remove_unused_columns=False,
        **fsdp,
        **(extra or {}),
    )


class CheckedTrainerMixin:
    """Mixed into the Trainer (or distill's subclass of it): remembers whether this step's losses and
    gradient norm were finite, and steps a time-fitted schedule when given a `time_plan`."""

    _finite = None
    time_plan = None  # a TimePlan: its schedule replaces the Trainer's own

    def training_step(self, *a, **kw):
        import torch

        loss = super().training_step(*a, **kw)
        ok = torch.isfinite(loss.detach()).all()
        self._finite = ok if self._finite is None else self._finite & ok
        return loss

    def _get_grad_norm(self, *a, **kw):
        import torch

        gn = super()._get_grad_norm(*a, **kw)
        if gn is not None:
            ok = torch.isfinite(torch.as_tensor(gn)).all()
            self._finite = ok if self._finite is None else self._finite & ok.to(self._finite.device)
        return gn

    def _track_num_input_tokens(self, inputs):
        """TRL's preference batches have no `input_ids` (prompt_, chosen_, rejected_, completion_input_ids):
        the Trainer counted nothing and `tokens`/`tokens_per_s` read 0. Count each part's tokens, as
        the Trainer counts `input_ids` ('all': padding included); KTO's mismatched KL_ pairs are not data."""
        if "input_ids" in inputs or self.args.include_num_input_tokens_seen == "no":
            return super()._track_num_input_tokens(inputs)
        import torch

        parts = [k for k in inputs if k.endswith("_input_ids") and not k.startswith("KL_") and torch.is_tensor(inputs[k])]
        if not parts:
            return super()._track_num_input_tokens(inputs)
        n = torch.as_tensor(sum(inputs[k].numel() for k in parts), device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(n).sum().item()

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.time_plan is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        from torch.optim.lr_scheduler import LambdaLR

        sched = self.time_plan.make_schedule(self.args.get_warmup_steps(num_training_steps), num_training_steps)
        self.lr_scheduler = LambdaLR(optimizer if optimizer is not None else self.optimizer, sched)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def step_was_finite(self) -> bool:
        ok, self._finite = self._finite, None
        return True if ok is None else bool(ok.item())  # one sync per optimizer step


def make_trainer(base, time_plan, **kwargs):
    """`base` (a Trainer class; None: transformers.Trainer) with the checks above, built with
    `kwargs`. `time_plan`: None keeps the Trainer's own schedule. Without its printing and
    progress: llmctl's callbacks (added by the caller) replace them."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    cls = type("CheckedTrainer", (CheckedTrainerMixin, base or Trainer), {})
    trainer = cls(**kwargs)
    trainer.time_plan = time_plan
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer


def eval_loss(model, ds, collate, batch_size: int) -> float:
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
