"""Models: device and dtype choice, loading for inference.

Building from scratch, loading pretrained weights for training and LoRA live here too
(see the train stage). No I/O beyond Hugging Face's own loading, no argument parsing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.errors import ConfigError, StageInputError


def pick_device(pref: str = "auto"):
    """'auto' -> cuda, then mps, then cpu. An explicit choice that is absent is a ConfigError."""
    import torch

    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but torch sees no CUDA device: use 'auto' or 'cpu'")
    if pref == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' was asked for but is not available: use 'auto' or 'cpu'")
    return torch.device(pref)


def pick_dtype(precision: str, device) -> Any:
    """'auto' is bf16 on a GPU that supports it, fp32 elsewhere (CPU bf16 is slow and lossy)."""
    import torch

    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve_model_path(explicit: str | None, rundir, cfg, stage: str, prefer_export: bool = False) -> str:
    """The model a downstream stage should use: an explicit path/hub id, else the run's.

    A run's model must come from a complete, up-to-date train stage (exit 3 otherwise).
    """
    if explicit:
        p = Path(explicit)
        if p.exists() and not (p / "config.json").is_file():
            raise StageInputError(f"{explicit}: not a Hugging Face model directory (no config.json)")
        return explicit
    if prefer_export:
        m = rundir.manifest("export")
        hf = rundir.export_dir("hf")
        if m and m.get("status") == "complete" and (hf / "config.json").is_file():
            return str(hf)
    rundir.require("train", cfg)
    return str(rundir.model_dir)


def load_for_inference(path: str, device=None, dtype=None, trust_remote_code: bool = False):
    """(model, tokenizer) in eval mode; the tokenizer pads on the left for generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or pick_device("auto")
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else pick_dtype("auto", device)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StageInputError(f"cannot load model '{path}': {first}") from None
    if tok.pad_token is None:
        # Generation pads batches; a model without a pad token pads with EOS (masked out).
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.to(device).eval()
    return model, tok
