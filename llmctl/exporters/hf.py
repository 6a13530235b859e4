"""A self-contained Hugging Face directory: safetensors (sharded), tokenizer, model card."""

from __future__ import annotations

import json
from pathlib import Path

DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
# Loose enough for the dtype's rounding, tight enough to catch a wrong tensor.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1.5e-1}
# hf-int8 (written by llmctl/quantize.py:save_hf_int8): relative to the largest reference logit,
# like the GGUF q8_0 check: int8 rounding, not a wrong tensor.
INT8_TOLERANCE = 6e-2


def write(model, tok, out: Path, cfg, card: str) -> dict:
    """Save a cast copy: `model` is shared with the other formats and must keep its float32 weights."""
    import copy

    import torch

    dtype = getattr(torch, cfg.export.dtype)
    # nn.Module.to casts in place: casting the shared model and back would leave it rounded
    saved = model if model.dtype == dtype else copy.deepcopy(model).to(dtype)
    saved.config.dtype = cfg.export.dtype
    saved.save_pretrained(out, max_shard_size=cfg.export.max_shard_size)
    del saved
    tok.save_pretrained(out)
    _compat_tokenizer_config(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    (out / "README.md").write_text(card, encoding="utf-8")
    return {"dtype": cfg.export.dtype}


def _compat_tokenizer_config(out: Path) -> None:
    """Name the generic fast tokenizer class so transformers 4.x loads the files too."""
    p = out / "tokenizer_config.json"
    if not p.is_file():
        return
    tc = json.loads(p.read_text())
    if tc.get("tokenizer_class") == "TokenizersBackend":
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = tc.pop("extra_special_tokens", None)
    if isinstance(extra, list) and extra:
        tc["additional_special_tokens"] = extra
    p.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")


def verify(out: Path, ref, ids, mask, cfg) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from llmctl.exporters.common import max_diff, reference_logits

    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return max_diff(reference_logits(m, ids, mask), ref, mask), TOLERANCE[cfg.export.dtype]


def verify_int8(out: Path, ref, ids, mask) -> tuple[float, float]:
    """Reload the saved hf-int8 directory as a user would and compare logits with f32's."""
    from transformers import AutoModelForCausalLM

    from llmctl.exporters.common import max_diff, reference_logits
    from llmctl.quantize import is_prequantized

    m = AutoModelForCausalLM.from_pretrained(out).eval()
    if not is_prequantized(m):
        raise ValueError(f"{out}: reloaded without its quantization_config")
    diff = max_diff(reference_logits(m, ids, mask), ref, mask)
    return diff, INT8_TOLERANCE * max(1.0, float(ref.abs().max()))
