"""Preference training (train.method dpo, orpo, simpo, kto) through TRL's trainers.

`make_trainer` is what `stage.setup` calls instead of the sft Trainer; everything around it
(callbacks, checkpoints, resume, signals, the time budget, the final save) is the same
machinery. TRL tokenizes the {prompt, chosen, rejected} (or, for kto, {prompt, completion,
label}) text rows prepare wrote.

The reference model (dpo and kto; orpo and simpo have none) is the model training starts from:
`model.name_or_path` (a hub model, or a previous run's RUN/train/model to train on top of
it), or the seeded initialisation of a new model. With LoRA it is that base with the adapter
disabled (no second copy in memory); otherwise a frozen copy made before the first step,
so a resumed run rebuilds the same reference.
"""

from __future__ import annotations

import copy

from llmctl.errors import ConfigError

# Keys of the trainers' logs copied into metrics.jsonl (train and eval).
LOG_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "eval_rewards/accuracies", "eval_rewards/margins")
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}
REFERENCE_METHODS = ("dpo", "kto")


def reference_name(cfg) -> str | None:
    """What the manifest records as the reference model: None for reference-free methods."""
    if cfg.train.method not in REFERENCE_METHODS:
        return None
    base = cfg.model.name_or_path or f"the seeded initialisation of model.arch={cfg.model.arch} (train.seed, else run.seed)"
    return base + (" (LoRA adapter disabled)" if cfg.model.lora.enabled else "")


def reference_lineage(cfg) -> dict:
    """RUN/train/manifest.json's `preference`: the method and its reference model; a local
    starting model (a previous run's model) also by its identity (config hash, weights)."""
    from pathlib import Path

    from llmctl.modeling import model_identity

    out = {"method": cfg.train.method, "reference_model": reference_name(cfg)}
    if out["reference_model"] and cfg.model.name_or_path and Path(cfg.model.name_or_path).is_dir():
        out["reference_identity"] = model_identity(str(Path(cfg.model.name_or_path).resolve()))
    return out


def reference_model(cfg, tok):
    """The reference as eval rebuilds it: the starting model (for every method: orpo and simpo
    train without one, but their implicit reward is measured against the same start)."""
    from llmctl.modeling import build_from_scratch, load_for_inference

    if cfg.model.name_or_path:
        return load_for_inference(cfg.model.name_or_path)[0]
    return build_from_scratch(cfg, tok).eval()


def trainer_and_config(cfg):
    """(TRL trainer class, its config class, the config's method-specific keyword arguments)."""
    try:
        import trl  # noqa: F401
    except ImportError:
        raise ConfigError(f"train.method={cfg.train.method} needs TRL: pip install 'llmctl[preference]'") from None
    t = cfg.train
    beta = t.beta if t.beta is not None else DEFAULT_BETA[t.method]
    length = {"max_length": cfg.data.block_size}
    if t.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig, {**length, "beta": beta, "loss_type": [t.loss_type or "sigmoid"], "label_smoothing": t.label_smoothing or 0.0}
    if t.method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer, KTOConfig, {**length, "beta": beta, "desirable_weight": t.desirable_weight or 1.0,
                                       "undesirable_weight": t.undesirable_weight or 1.0}
    if t.method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig, {**length, "beta": beta}
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    # SimPO is CPO's loss with the SFT term off (cpo_alpha=0): no reference model.
    gamma = t.simpo_gamma if t.simpo_gamma is not None else 0.5
    return CPOTrainer, CPOConfig, {**length, "beta": beta, "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": gamma}


def make_trainer(cfg, model, tok, args_for, train_ds, val_ds, time_plan):
    """The TRL trainer for train.method, with llmctl's checks mixed in (build.make_trainer).
    `args_for(cls, extra)`: the TrainingArguments of build.training_arguments as `cls`."""
    import warnings

    from llmctl.train import build

    # TRL 1.16 asks transformers 5 the old name at every eval: noise, not the user's to fix.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    trainer_cls, config_cls, extra = trainer_and_config(cfg)
    args = args_for(config_cls, extra)
    kwargs = {}
    if cfg.train.method in REFERENCE_METHODS and not cfg.model.lora.enabled:
        # A frozen copy of the starting weights; TRL would otherwise reload from a path the
        # model may not have (a new model has none).
        ref = copy.deepcopy(model)
        ref.requires_grad_(False)
        kwargs["ref_model"] = ref
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return build.make_trainer(trainer_cls, time_plan, model=model, args=args, train_dataset=_text(train_ds),
                              eval_dataset=_text(val_ds), processing_class=tok, **kwargs)


def _text(ds):
    return None if ds is None else ds.with_format(None)
