"""Combinations no stage can carry out, refused before any work.

The schema (llmctl/config/schema.py) checks what the YAML alone decides. What needs the model's
own config (its architecture, for an export format) is checked here, by `config validate`
and every stage, so that a run never trains for hours and then fails at `export`.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmctl.errors import ConfigError
from llmctl.export_support import architectures


def model_type(cfg, fetch: bool = False) -> tuple[str | None, str]:
    """(model_type, where it comes from) of the model a config trains.

    From scratch it is `model.arch`; a local directory has its config.json; a hub id is
    read from the local Hugging Face cache, or downloaded (config.json only) with
    `fetch`. None when it cannot be known without loading the model.
    """
    name = cfg.model.name_or_path
    if name is None:
        return cfg.model.arch, "model.arch"
    where = f"model.name_or_path ({name})"
    local = Path(name).expanduser() / "config.json"
    path = str(local) if local.is_file() else None
    if path is None and not Path(name).expanduser().exists():
        try:
            from huggingface_hub import hf_hub_download, try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
            path = cached if isinstance(cached, str) else None
            if path is None and fetch:
                path = hf_hub_download(name, "config.json")
        except Exception:  # offline, unknown repo, bad id: the stage that loads it will say so
            path = None
    if path is None:
        return None, where
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")).get("model_type"), where
    except (OSError, ValueError):
        return None, where


def check_export_formats(formats, mtype: str | None, where: str) -> None:
    """ConfigError if a requested export format cannot take this architecture."""
    if mtype is None:
        return
    for fmt in formats:
        archs = architectures(fmt)  # llmctl/export_support.py, which the exporters read too
        if archs is not None and mtype not in archs:
            raise ConfigError(
                f"export.formats has {fmt}, which llmctl writes for {', '.join(archs)} models only, but {where} is '{mtype}': "
                f"drop {fmt} from export.formats (hf and onnx work for every architecture)"
            )


def check(cfg, fetch: bool = False) -> None:
    """Everything a config asks for can be done (see the module docstring)."""
    mtype, where = model_type(cfg, fetch=fetch)
    try:
        if cfg.data.format == "image_text":  # the language model's type is not the model's: its own rules
            from llmctl.export_support import check_image_text_formats

            pretrained = cfg.model.name_or_path is not None
            check_image_text_formats(cfg.export.formats, tower=None if pretrained else cfg.model.vision.tower,
                                     model_type=mtype if pretrained else None)
        else:
            check_export_formats(cfg.export.formats, mtype, where)
    except ConfigError as e:
        raise ConfigError(f"{cfg.source}: {e}") from None


def builtin_format_problem(cfg) -> str | None:
    """Why `data.format` cannot read the builtin corpus (plain Python source), with fixes that work."""
    d = cfg.data
    # preference: pairs built from held-out lines; image_text: synthetic shape scenes (llmctl.vision.shapes)
    if d.source != "builtin" or d.format in ("text", "preference", "image_text"):
        return None
    need = {"chat": "conversations (records with a 'messages' list of {role, content})",
            "prompt_completion": "prompt/completion pairs (records with 'prompt' and 'completion')",
            "unpaired_preference": "labelled completions (records with 'prompt', 'completion' and 'label')"}[d.format]
    return (
        f"data.format is {d.format} but data.source is builtin, the Python standard library's source as plain text: "
        f"it has no {need.split(' (')[0]}. Set data.format: text to train on it, or data.source: files with "
        f"data.paths listing JSONL files of {need}"
    )


def footguns(cfg) -> list[str]:
    """Settings that run but almost surely do not do what was meant (`config validate` warns)."""
    t, m = cfg.train, cfg.model
    out = []
    if t.max_steps is not None and t.warmup_steps >= t.max_steps:
        out.append(
            f"train.warmup_steps ({t.warmup_steps}) >= train.max_steps ({t.max_steps}): the learning rate is still "
            f"warming up when training ends and never reaches train.lr; set train.warmup_steps below "
            f"train.max_steps (about a tenth of it: {t.max_steps // 10})"
        )
    pruned_teacher = cfg.distill is not None and cfg.distill.student_init == "prune"
    if m.lora.enabled and m.name_or_path is None and not pruned_teacher:
        out.append(
            "model.lora.enabled with no model.name_or_path: LoRA trains small adapters next to frozen weights, and a model "
            "built from scratch has random ones that never learn; set model.name_or_path to a pretrained model, "
            "or model.lora.enabled: false to train every weight"
        )
    if t.method != "sft" and m.name_or_path is None and not m.lora.enabled:
        out.append(
            f"train.method={t.method} with no model.name_or_path: preference training starts from a model that already "
            "writes answers (and, for dpo and kto, measures against it as the reference); a new model's random "
            "initialisation is neither. Set model.name_or_path to a pretrained model or a previous run's train/model"
        )
    problem = builtin_format_problem(cfg)
    if problem:
        out.append(problem + " (prepare will refuse this config)")
    return out
