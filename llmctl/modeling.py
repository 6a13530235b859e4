"""Models: device and dtype choice, loading for inference.

Building from scratch, loading pretrained weights for training and LoRA live here too
(see the train stage). No I/O beyond Hugging Face's own loading, no argument parsing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.errors import ConfigError, StageInputError


SAFETENSORS_HINT = (
    " (llmctl loads safetensors weights only, since pickled .bin weights can run code: "
    "convert them once in a trusted environment with model.save_pretrained(dir))"
)


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
        if p.is_file() and p.suffix.lower() == ".gguf":
            return explicit  # loaded (dequantized) by transformers' GGUF reader
        if p.exists() and not (p / "config.json").is_file():
            raise StageInputError(f"{explicit}: not a Hugging Face model directory (no config.json) or a .gguf file")
        return explicit
    if prefer_export:
        m = rundir.manifest("export")
        hf = rundir.export_dir("hf")
        if m and m.get("status") == "complete" and (hf / "config.json").is_file():
            # The same rule as every stage: an export of an older model is stale (exit 3).
            rundir.require("export", cfg)
            return str(hf)
    rundir.require("train", cfg)
    return str(rundir.model_dir)


def model_identity(path: str) -> dict:
    """What identifies a model given by path (`--model`): its config and weights' size and mtime."""
    import hashlib

    p = Path(path)
    ident = {"path": path}
    if p.is_file():  # a GGUF file
        st = p.stat()
        ident["weights"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return ident
    cfg_file = p / "config.json"
    if cfg_file.is_file():
        ident["config_sha256"] = hashlib.sha256(cfg_file.read_bytes()).hexdigest()[:16]
        w = p / "model.safetensors"
        if w.is_file():
            st = w.stat()
            ident["weights"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return ident


def is_gguf(path: str) -> bool:
    return str(path).lower().endswith(".gguf") and Path(path).is_file()


def hf_source(path: str) -> tuple[str, dict]:
    """(what to pass to from_pretrained, extra kwargs): a .gguf file is its folder + gguf_file."""
    if is_gguf(path):
        return str(Path(path).parent), {"gguf_file": Path(path).name}
    return path, {}


def load_for_inference(path: str, device=None, dtype=None, trust_remote_code: bool = False, quantize: str | None = None, quantize_key: str = "--quantize"):
    """(model, tokenizer) in eval mode; the tokenizer pads on the left for generation.

    `path` is a model directory, a hub id or a `.gguf` file (transformers dequantizes GGUF
    tensors to float32: quality is the file's, speed is not llama.cpp's). `quantize`
    ('int8' | 'int4') quantizes after loading (llmctl/quantize.py); the method applied is
    in `model.llmctl_quantization`.

    Weights load from safetensors only (a pickled pytorch_model.bin can run code when
    unpickled); custom model code runs only with trust_remote_code.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmctl import quantize as q

    device = device or pick_device("auto")
    method = q.check(quantize, device, key=quantize_key)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else pick_dtype("auto", device)
    if method:
        dtype = q.load_dtype(method)
    src, kw = hf_source(path)
    kw["trust_remote_code"] = trust_remote_code
    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw, **({} if "gguf_file" in kw else {"use_safetensors": True}))
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = SAFETENSORS_HINT if "safetensors" in first else ""
        raise StageInputError(f"cannot load model '{path}': {first}{hint}") from None
    except (ValueError, KeyError, RuntimeError) as e:
        if "gguf_file" not in kw:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StageInputError(f"cannot load GGUF file '{path}' with transformers' GGUF reader: {first}") from None
    if tok.pad_token is None:
        # Generation pads batches; a model without a pad token pads with EOS (masked out).
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.to(device).eval()
    model.llmctl_quantization = q.quantize_model(model, method, key=quantize_key)
    return model, tok


# --------------------------------------------------------------------------- training
def build_from_scratch(cfg, tok):
    """A randomly initialised model with the config's sizes and the tokenizer's vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    m = cfg.model
    common = dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=m.tie_embeddings,
    )
    if m.arch == "llama":
        inter = m.intermediate_size or (int(8 * m.hidden_size / 3) + 31) // 32 * 32
        mc = LlamaConfig(
            hidden_size=m.hidden_size,
            intermediate_size=inter,
            num_hidden_layers=m.n_layers,
            num_attention_heads=m.n_heads,
            num_key_value_heads=m.n_kv_heads or m.n_heads,
            max_position_embeddings=m.context_length,
            rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
            attention_dropout=m.dropout,
            **common,
        )
    else:
        mc = GPT2Config(
            n_embd=m.hidden_size,
            n_inner=m.intermediate_size,
            n_layer=m.n_layers,
            n_head=m.n_heads,
            n_positions=m.context_length,
            resid_pdrop=m.dropout,
            embd_pdrop=m.dropout,
            attn_pdrop=m.dropout,
            **common,
        )
    torch.manual_seed(cfg.train.seed if cfg.train.seed is not None else cfg.run.seed)  # same seed, same initial weights
    return AutoModelForCausalLM.from_config(mc, attn_implementation=m.attn_implementation, dtype=torch.float32)


def load_pretrained_for_training(cfg, tok, dtype):
    """A pretrained model whose vocabulary follows the prepared tokenizer."""
    from transformers import AutoModelForCausalLM

    m = cfg.model
    try:
        model = AutoModelForCausalLM.from_pretrained(
            m.name_or_path, dtype=dtype, trust_remote_code=m.trust_remote_code, attn_implementation=m.attn_implementation,
            use_safetensors=True,
        )
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = SAFETENSORS_HINT if "safetensors" in first else ""
        raise StageInputError(f"model.name_or_path: cannot load '{m.name_or_path}': {first}{hint}") from None
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tok) > vocab:
        # Added tokens (pad, chat markers): grow the embeddings; the rest of the vocab is shared.
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=8)
    if model.config.pad_token_id is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    return model


def apply_lora(model, cfg):
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise ConfigError("model.lora.enabled needs peft: pip install 'llmctl[lora]'") from None
    lc = cfg.model.lora
    config = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
        exclude_modules=_frozen_targets(model, lc.target_modules),
        task_type=TaskType.CAUSAL_LM,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"model.lora.target_modules: {str(e).splitlines()[0]}") from None


def _frozen_targets(model, targets) -> list[str] | None:
    """LoRA targets inside parts frozen before LoRA (model.freeze of an image-text model): an
    adapter there would train, and merging it would change a part the config froze. None: none."""
    if not isinstance(targets, list):
        return None
    frozen = [n for n, m in model.named_modules()
              if any(n == t or n.endswith("." + t) for t in targets) and not any(p.requires_grad for p in m.parameters())]
    return frozen or None


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
