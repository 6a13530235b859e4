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

`ReferenceProbe` keeps the reference honest: its log-probs on a few held-out rows are taken
before the first step, compared after the last (the frozen copy, or the adapter-disabled base,
must not have moved) and recorded in the manifest, where eval compares the reference it
rebuilds against them.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

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
    starting model (a previous run's model) also by its files' hash, so that retraining it makes
    this run stale (rundir.teacher_changed reads the record, as it does a distilled student's teacher)."""
    from pathlib import Path

    from llmctl.rundir import model_hash, model_stat

    out = {"method": cfg.train.method, "reference_model": reference_name(cfg)}
    start = Path(cfg.model.name_or_path).expanduser() if cfg.model.name_or_path else None
    if start is not None and (start / "config.json").is_file():
        path = str(start.resolve())
        out["reference_identity"] = {"kind": "dir", "path": path, "model_hash": model_hash(path), "stat": model_stat(path)}
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


# --------------------------------------------------------------------------- scoring answers
def answer_logps(model, tok, prompts: list[str], answers: list[str], max_length: int, batch_size: int) -> list[tuple[float, int]]:
    """(sum of log p(answer + EOS | prompt), answer tokens) per pair, encoded as prepare encodes
    prompt/completion pairs (formats.encode_pairs: BOS as the tokenizer wants, the prompt cut
    from the left). An answer too long for max_length on its own scores (-inf, 0)."""
    import torch

    from llmctl.data.formats import IGNORE, answers_without_eos, encode_pairs

    enc = encode_pairs({"prompt": prompts, "completion": answers_without_eos(tok, answers)}, tok, max_length, tok.eos_token_id)
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[tuple[float, int]] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            ids_b, lab_b = enc["input_ids"][i : i + batch_size], enc["labels"][i : i + batch_size]
            n = max(max(len(r) for r in ids_b), 2)
            ids = torch.full((len(ids_b), n), pad, dtype=torch.long)
            labels = torch.full((len(ids_b), n), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(ids_b), n), dtype=torch.long)
            for j, (r, lab) in enumerate(zip(ids_b, lab_b)):
                ids[j, : len(r)], labels[j, : len(r)], mask[j, : len(r)] = torch.as_tensor(r), torch.as_tensor(lab), 1
            logp = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1).cpu()
            target = labels[:, 1:]
            scored = target != IGNORE
            tok_lp = logp[:, :-1].gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * scored
            for j in range(len(ids_b)):
                k = int(scored[j].sum())
                out.append((tok_lp[j].sum().item() if k else float("-inf"), k))
    model.train(was_training)
    return out


def row_answers(rows) -> tuple[list[str], list[str]]:
    """(prompts, answers) of preference rows, each pair as two (prompt, chosen), (prompt, rejected);
    kto's rows as (prompt, completion)."""
    rows = rows.with_format(None)
    if "completion" in rows.column_names:
        return list(rows["prompt"]), list(rows["completion"])
    prompts, answers = [], []
    for r in rows:
        prompts += [r["prompt"], r["prompt"]]
        answers += [r["chosen"], r["rejected"]]
    return prompts, answers


# --------------------------------------------------------------------------- the reference, checked
PROBE_ROWS = 8  # held-out rows whose reference log-probs are recorded: a few forward passes
PROBE_TOL = 1e-3  # nats, plus 1e-5 of the value: thread counts and kernels, not another model


def probe_diff(a: list[float], b: list[float]) -> float:
    """The largest difference between two probes' log-probs (inf when they score different rows)."""
    if len(a) != len(b):
        return float("inf")
    return round(max([0.0] + [abs(x - y) for x, y in zip(a, b) if x != y]), 6)


def probe_matches(a: list[float], b: list[float]) -> bool:
    """Whether two probes are one model's: equal up to PROBE_TOL."""
    return len(a) == len(b) and all(x == y or abs(x - y) <= PROBE_TOL + 1e-5 * abs(y) for x, y in zip(a, b))


class ReferenceProbe:
    """The reference's log-probs on the first PROBE_ROWS rows of a split, at the start of training
    and (methods with a reference) after the last step."""

    def __init__(self, cfg, tok, rows, split: str):
        self.cfg, self.tok, self.split = cfg, tok, split
        self.rows = rows.select(range(min(len(rows), PROBE_ROWS)))
        self.start: list[float] | None = None

    def score(self, model, ctx=None) -> list[float]:
        prompts, answers = row_answers(self.rows)
        with ctx or nullcontext():
            lp = answer_logps(model, self.tok, prompts, answers, self.cfg.data.block_size, PROBE_ROWS)
        return [round(x, 6) for x, _ in lp]

    def begin(self, trainer) -> None:
        """Before the first step: the reference (or, for orpo and simpo, the starting model)."""
        self.start = self.score(*_reference_of(trainer, before_training=True))

    def record(self, trainer=None) -> dict:
        """The manifest's `reference_probe`; with `trainer` (after the last step of a method with
        a reference), how far the reference moved: 0.0 when it did not."""
        out = {"split": self.split, "rows": len(self.rows), "logps": self.start}
        if trainer is not None and self.cfg.train.method in REFERENCE_METHODS:
            after = self.score(*_reference_of(trainer))
            out["after_training"] = {"max_abs_diff": probe_diff(after, self.start), "unchanged": probe_matches(after, self.start)}
        return out


def _reference_of(trainer, before_training: bool = False):
    """(the model the trainer measures against, the context to score it in): TRL's frozen copy,
    or the LoRA model with its adapter disabled; before training, the model itself for
    reference-free methods (their eval measures against the start)."""
    ref = getattr(trainer, "ref_model", None)
    if ref is not None:
        return ref, None
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "disable_adapter"):
        return model, model.disable_adapter()
    if not before_training:
        raise ValueError("a reference-free method has no reference after training")
    return model, None
