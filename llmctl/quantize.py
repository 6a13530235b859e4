"""Quantization, in one place: `--quantize` at load time and the `hf-int8` export.

Used by eval, generate and serve (`quantize_model` after loading) and by export
(`save_hf_int8`). Measured on this project's 2-core CPU (bench/compress.py):

- int8 (`--quantize int8`): torch's own dynamic quantization of every `nn.Linear`
  (`torch.ao.quantization.quantize_dynamic`, qint8 weights with a scale per output channel,
  activations quantized on the fly per call, fbgemm kernels). Per channel, not per tensor:
  finer scales, and the rows of several projections with one input (q/k/v, gate/up) can be
  packed into one matmul that computes exactly what the separate ones do, which the lean
  decoder does (llmctl/inference/lean.py: one kernel call instead of three costs less at the
  few rows of a decode step). It beat torchao's `Int8WeightOnlyConfig` (eager,
  0.9-1.0x f32) and `Int8DynamicActivationInt8WeightConfig` (0.1-0.2x) on decode. torch
  marks the API deprecated in favour of torchao; it still ships in torch 2.13.
  Embeddings and norms stay float32. CPU only (the kernels are x86/ARM CPU kernels).
- int4 (`--quantize int4`): torchao's CPU int4 weight-only path
  (`PrototypeInt4WeightOnlyConfig`, groups of 32) on a bfloat16 model; needs the `quant`
  extra (torchao). Layers whose input is not a multiple of 32 or output not a multiple of
  16 (what the int4 CPU kernel packs) stay bfloat16.
- hf-int8 export: transformers' `TorchAoConfig(Int8WeightOnlyConfig())`, which
  `save_pretrained` writes and `from_pretrained` reloads (torchao needed to load it); the
  export stage reloads and checks it like every export (llmctl/exporters/hf.py:verify_int8).

Nothing here imports the exporters, the stages or the server: loading a model for eval,
generate or serve (llmctl/modeling.py) needs only this module.
"""

from __future__ import annotations

from pathlib import Path

from llmctl.errors import ConfigError

METHODS = ("int8", "int4")
INT4_GROUP = 32


def check(method: str | None, device=None, key: str = "--quantize") -> str | None:
    """Normalise and validate a method before any loading ('none' and None mean off)."""
    if method in (None, "", "none"):
        return None
    if method not in METHODS:
        raise ConfigError(f"{key} {method!r}: expected one of none, {', '.join(METHODS)}")
    if device is not None and getattr(device, "type", str(device)) != "cpu":
        raise ConfigError(f"{key} {method}: quantized inference runs on the CPU here; set the device to cpu or drop {key}")
    if method == "int4":
        _torchao(key)
    return method


def _torchao(key: str):
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise ConfigError(f"{key} int4 needs torchao: pip install 'llmctl[quant]'") from None
    return torchao


def load_dtype(method: str | None):
    """The dtype to load weights in before `quantize_model` (int4's CPU kernel wants bf16)."""
    import torch

    return torch.bfloat16 if method == "int4" else torch.float32


def is_prequantized(model) -> bool:
    """True for a model loaded from a quantized checkpoint (hf-int8) or a GGUF file."""
    return getattr(model.config, "quantization_config", None) is not None


def quantize_model(model, method: str | None, key: str = "--quantize") -> dict:
    """Quantize `model` in place for CPU inference; returns what was done (for manifests)."""
    import torch

    method = check(method, key=key)
    if method is None:
        return {"method": "none"}
    if is_prequantized(model):
        raise ConfigError(f"{key} {method}: this model is already quantized (its config has a quantization_config); drop {key}")
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if method == "int8":
        import warnings

        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation notice: see the module docstring
            # A tied lm_head gets its own int8 copy; the embedding stays float32.
            quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
        return {"method": "int8", "library": f"torch {torch.__version__} (torch.ao quantize_dynamic, per channel)", "quantized_layers": len(linears), "kept": []}
    _torchao(key)
    import torchao
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    if model.dtype != torch.bfloat16:
        model.to(torch.bfloat16)

    def fits(m, name) -> bool:
        return isinstance(m, torch.nn.Linear) and m.in_features % INT4_GROUP == 0 and m.out_features % 16 == 0

    kept = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not fits(m, n)]
    quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP, set_inductor_config=False), filter_fn=fits)
    return {"method": "int4", "library": f"torchao {torchao.__version__} (PrototypeInt4WeightOnlyConfig, group {INT4_GROUP}, bf16)", "quantized_layers": len(linears) - len(kept), "kept": kept}


# --------------------------------------------------------------------------- hf-int8 export
def save_hf_int8(model_dir: Path, out: Path) -> dict:
    """The trained model with int8 weight-only Linear layers, as a reloadable HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, TorchAoConfig

    _torchao("export.formats hf-int8:")
    from torchao.quantization import Int8WeightOnlyConfig

    qc = TorchAoConfig(Int8WeightOnlyConfig())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=qc)
    model.save_pretrained(out)
    return {"method": "int8 weight-only (torchao TorchAoConfig)", "loads_with": "AutoModelForCausalLM.from_pretrained(DIR) with torchao installed"}


def model_bytes(path: Path) -> int:
    """Weight bytes of a model directory (its safetensors) or a single file (GGUF)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))

