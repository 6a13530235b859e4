"""GGUF for llama.cpp and Ollama (llama architecture), tokenizer embedded, via `gguf`.

The public surface, for `llmctl export` and anything that evaluates a GGUF:

- `TYPES`, `TOLERANCE`: the tensor types written and each one's verification tolerance.
- `check_supported(model, tok) -> str`: ConfigError (exit 2) for anything llama.cpp would not run
  the way it was trained; otherwise the `tokenizer.ggml.pre` name to write.
- `write(model, tok, out, qtype, name) -> Path`: `out/model-{qtype}.gguf`.
- `tensor_types(path) -> {tensor: type}` and `kept_higher_precision(path, qtype)`: what the file holds.
- `load(path) -> (model, tokenizer)`: a transformers model and tokenizer rebuilt from the file alone
  (every hyperparameter, rope scaling, biases; the tokenizer split as llama.cpp splits it).
- `verify(path, ref, ids, mask, qtype, tok, model) -> (diff, tolerance, checks)`.
- `llama_cpp(tool)`: the path of a llama.cpp binary when one is installed, else None.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from llmctl.errors import ConfigError
from llmctl.export_support import architectures

SUPPORTED = architectures("gguf")  # llmctl/export_support.py: the pre-flight checks read the same list
TYPES = ("f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# Largest |logit diff| from the trained model, relative to its largest logit: each type's rounding
# (measured on tiny random llamas: q8_0 0.02, q5 0.15-0.18, q4 0.25-0.29). A wrong tensor is caught
# by the exact `intended_weights` check in `verify`, whatever the type.
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "q8_0": 6e-2, "q5_1": 0.25, "q5_0": 0.25, "q4_1": 0.4, "q4_0": 0.4}
ROPE_TYPES = ("default", "linear", "llama3")
_BLOCK = 32  # every type gguf-py quantizes (q4_0 ... q8_0) packs rows in blocks of 32


def _ggml_type(qtype: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, qtype.upper())


def _file_type(qtype: str):
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
        "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
        "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[qtype]


def _rope(c) -> dict:
    rp = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    rp.setdefault("rope_theta", getattr(c, "rope_theta", 10000.0))
    rp["rope_type"] = rp.get("rope_type") or rp.get("type") or "default"
    return rp


def _head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def check_supported(model, tok=None) -> str | None:
    """Refuse (exit 2) what llama.cpp's llama graph would not compute as trained; the pre-tokenizer name."""
    c = model.config
    mt = c.model_type
    if mt not in SUPPORTED:
        raise ConfigError(
            f"export.formats: gguf supports {', '.join(SUPPORTED)} models, not '{mt}': "
            "drop gguf from export.formats (hf and onnx work for every architecture)"
        )
    act = getattr(c, "hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"export gguf: llama.cpp's llama graph uses silu, this model's hidden_act is '{act}': drop gguf from export.formats")
    rope = _rope(c)
    if rope["rope_type"] not in ROPE_TYPES:
        raise ConfigError(
            f"export gguf: rope_type '{rope['rope_type']}' is not written by llmctl's GGUF export "
            f"(supported: {', '.join(ROPE_TYPES)}): drop gguf from export.formats"
        )
    if tok is None:
        return None
    from llmctl.exporters import gguf_tokenizer

    top = max(tok.get_vocab().values())
    if top >= c.vocab_size:
        raise ConfigError(f"export gguf: the tokenizer has id {top} but the model's vocab_size is {c.vocab_size}: llama.cpp could not embed it")

    return gguf_tokenizer.identify(tok)


def _permute(w, n_head: int):
    """HF q/k rows (and biases) -> llama.cpp's rotary layout (interleaved halves per head)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w, n_head: int):
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# gguf name pattern -> HF state-dict name pattern ({i}: layer), and which rotary permutation applies
_LAYER = {
    "attn_norm.weight": ("input_layernorm.weight", None),
    "attn_q.weight": ("self_attn.q_proj.weight", "q"),
    "attn_q.bias": ("self_attn.q_proj.bias", "q"),
    "attn_k.weight": ("self_attn.k_proj.weight", "k"),
    "attn_k.bias": ("self_attn.k_proj.bias", "k"),
    "attn_v.weight": ("self_attn.v_proj.weight", None),
    "attn_v.bias": ("self_attn.v_proj.bias", None),
    "attn_output.weight": ("self_attn.o_proj.weight", None),
    "attn_output.bias": ("self_attn.o_proj.bias", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
    "ffn_gate.weight": ("mlp.gate_proj.weight", None),
    "ffn_gate.bias": ("mlp.gate_proj.bias", None),
    "ffn_up.weight": ("mlp.up_proj.weight", None),
    "ffn_up.bias": ("mlp.up_proj.bias", None),
    "ffn_down.weight": ("mlp.down_proj.weight", None),
    "ffn_down.bias": ("mlp.down_proj.bias", None),
}


def _tensors(model):
    """(gguf name, float32 numpy array) in llama.cpp's naming, every tensor the model has."""
    c = model.config
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    heads = {"q": c.num_attention_heads, "k": c.num_key_value_heads or c.num_attention_heads}
    yield "token_embd.weight", sd["model.embed_tokens.weight"]
    for i in range(c.num_hidden_layers):
        for gname, (hname, perm) in _LAYER.items():
            arr = sd.get(f"model.layers.{i}.{hname}")
            if arr is not None:
                yield f"blk.{i}.{gname}", _permute(arr, heads[perm]) if perm else arr
    yield "output_norm.weight", sd["model.norm.weight"]
    if not c.tie_word_embeddings:  # tied: llama.cpp reuses token_embd
        yield "output.weight", sd["lm_head.weight"]
    factors = _rope_factors(model)
    if factors is not None:
        yield "rope_freqs.weight", factors


def _rope_factors(model):
    """llama3-style rope: per-frequency divisors, read off the model's own rotary embedding."""
    if _rope(model.config)["rope_type"] != "llama3":
        return None
    rot = model.model.rotary_emb
    default, _ = rot.compute_default_rope_parameters(model.config)
    return (default / rot.original_inv_freq.float().cpu()).numpy().astype("float32")


def _add_hparams(w, model, name: str, qtype: str) -> None:
    import gguf

    c = model.config
    w.add_name(name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads or c.num_attention_heads)
    hd = _head_dim(c)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    rope = _rope(c)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(_file_type(qtype))


def write(model, tok, out: Path, qtype: str, name: str, pre: str | None = None) -> Path:
    """`out/model-{qtype}.gguf`. Rows not a multiple of 32 stay f16 in quantized files, as llama.cpp's converter does."""
    import gguf
    import numpy as np

    from llmctl.exporters import gguf_tokenizer

    if qtype not in TYPES:
        raise ConfigError(f"export.gguf_types: {qtype!r} is not one of {', '.join(TYPES)}")
    pre = pre or check_supported(model, tok)
    path = out / f"model-{qtype}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    _add_hparams(w, model, name, qtype)
    gguf_tokenizer.add_to_writer(w, tok, model.config.vocab_size, pre)
    for tname, arr in _tensors(model):
        if arr.ndim == 1 or qtype == "f32":  # norms, biases and rope factors stay f32, as llama.cpp expects
            w.add_tensor(tname, arr.astype(np.float32))
        elif qtype == "f16" or arr.shape[-1] % _BLOCK:
            w.add_tensor(tname, arr.astype(np.float16))
        else:
            q = gguf.quants.quantize(arr.astype(np.float32), _ggml_type(qtype))
            w.add_tensor(tname, q, raw_shape=q.shape, raw_dtype=_ggml_type(qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(str(path)).tensors}


def kept_higher_precision(path: Path, qtype: str) -> dict[str, str]:
    """2-D tensors stored above `qtype` (their rows are not a multiple of the 32-value block)."""
    import gguf

    return {
        t.name: t.tensor_type.name.lower()
        for t in gguf.GGUFReader(str(path)).tensors
        if len(t.shape) > 1 and t.tensor_type.name.lower() != qtype
    }


def _meta(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def load(path: Path, dtype=None):
    """(LlamaForCausalLM, tokenizer) rebuilt from the GGUF alone, as llama.cpp would run it.

    transformers' own GGUF loader ignores rope scaling, rope factors and bias tensors for llama,
    so the config is rebuilt here from every key this exporter writes.
    """
    import gguf
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmctl.exporters import gguf_tokenizer

    reader = gguf.GGUFReader(str(path))
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}; llmctl reads back llama GGUF files only")
    k = lambda key, default=None: _meta(reader, f"llama.{key}", default)  # noqa: E731
    tensors = {t.name: t for t in reader.tensors}
    heads, kv = k("attention.head_count"), k("attention.head_count_kv")
    rope = {"rope_type": "default", "rope_theta": float(k("rope.freq_base", 10000.0))}
    if k("rope.scaling.type") == "linear":
        rope.update(rope_type="linear", factor=float(k("rope.scaling.factor")))
    tok, _ = gguf_tokenizer.from_gguf(path)
    mc = LlamaConfig(
        vocab_size=int(k("vocab_size", len(_meta(reader, "tokenizer.ggml.tokens")))),
        hidden_size=k("embedding_length"),
        intermediate_size=k("feed_forward_length"),
        num_hidden_layers=k("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=k("attention.key_length", k("embedding_length") // heads),
        max_position_embeddings=k("context_length"),
        rms_norm_eps=float(k("attention.layer_norm_rms_epsilon")),
        rope_parameters=rope,
        attention_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias="blk.0.ffn_gate.bias" in tensors,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=_meta(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_meta(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_meta(reader, "tokenizer.ggml.padding_token_id"),
    )
    model = LlamaForCausalLM(mc)
    nheads = {"q": heads, "k": kv}
    sd = {}
    for name, t in tensors.items():
        arr = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        arr = arr.reshape([int(d) for d in reversed(t.shape)]) if len(t.shape) > 1 else arr.reshape(-1)
        if name == "rope_freqs.weight":
            rot = model.model.rotary_emb
            inv = rot.compute_default_rope_parameters(mc)[0] / torch.from_numpy(arr.copy())
            rot.inv_freq, rot.original_inv_freq = inv.clone(), inv.clone()
            continue
        if name == "token_embd.weight":
            sd["model.embed_tokens.weight"] = arr
        elif name == "output_norm.weight":
            sd["model.norm.weight"] = arr
        elif name == "output.weight":
            sd["lm_head.weight"] = arr
        else:
            _, i, rest = name.split(".", 2)
            hname, perm = _LAYER[rest]
            sd[f"model.layers.{i}.{hname}"] = _unpermute(arr, nheads[perm]) if perm else arr
    missing, unexpected = model.load_state_dict({n: torch.from_numpy(a.copy()) for n, a in sd.items()}, strict=False)
    missing = [m for m in missing if not (mc.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: tensors missing {missing[:3]} / unexpected {unexpected[:3]}")
    if mc.tie_word_embeddings:
        model.tie_weights()
    model = model.eval()
    return (model.to(dtype) if dtype is not None else model), tok


def intended(model, qtype: str):
    """A copy of `model` holding exactly the values a `qtype` file should store (each matrix rounded
    through gguf's quantizer, the same choice of kept-higher-precision tensors as `write`)."""
    import copy

    import gguf
    import numpy as np
    import torch

    m = copy.deepcopy(model)
    if qtype == "f32":
        return m
    with torch.no_grad():
        for _, p in m.named_parameters():  # tied weights appear once
            if p.ndim != 2:
                continue
            a = p.detach().float().cpu().numpy()
            if qtype == "f16" or a.shape[-1] % _BLOCK:
                r = a.astype(np.float16).astype(np.float32)
            else:
                r = gguf.quants.dequantize(gguf.quants.quantize(a, _ggml_type(qtype)), _ggml_type(qtype))
            p.copy_(torch.from_numpy(np.ascontiguousarray(r, dtype=np.float32)))
    return m


def verify(path: Path, ref, ids, mask, qtype: str, tok=None, model=None, llama_cpp_tokenizer: bool = True) -> tuple[float, float, dict]:
    """(max |logit diff| vs the trained model, this type's tolerance, further checks).

    The file is rebuilt on its own (`load`). Further checks, each {"passed": bool, ...}:
    `intended_weights` (with `model`): its logits equal those of the model rounded exactly as the
    type should round it, so a wrong tensor shows however coarse the type; `tokenizer` (with
    `tok`): the embedded tokenizer gives `tok`'s ids on every probe text; `llama_cpp_tokenize`:
    the same through llama.cpp's own `llama-tokenize`, when it is installed (and
    `llama_cpp_tokenizer`: every type of one export embeds the same tokenizer, once is enough).
    """
    from llmctl.exporters import gguf_tokenizer
    from llmctl.exporters.common import max_diff, reference_logits

    m, _ = load(path)
    got = reference_logits(m, ids, mask)
    diff = max_diff(got, ref, mask)
    scale = max(1.0, float(ref.abs().max()))
    info: dict = {}
    if model is not None:
        d = max_diff(got, reference_logits(intended(model, qtype).eval(), ids, mask), mask)
        info["intended_weights"] = {"max_abs_diff": d, "tolerance": 1e-4 * scale, "passed": d <= 1e-4 * scale}
    if tok is not None:
        t = gguf_tokenizer.check_file(path, tok)
        info["tokenizer"] = {**t, "passed": t["mismatched"] == 0}
        if llama_cpp_tokenizer and llama_cpp("llama-tokenize"):
            try:
                t = llama_cpp_tokenize_check(path, tok)
                info["llama_cpp_tokenize"] = {**t, "passed": t["mismatched"] == 0}
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:  # llama.cpp refused the file
                info["llama_cpp_tokenize"] = {"passed": False, "error": str(e)}
    return diff, TOLERANCE[qtype] * scale, info


def llama_cpp(tool: str) -> Path | None:
    """A llama.cpp binary: in $LLAMA_CPP_BIN (a folder), on PATH, or in /opt/llamacpp/build/bin
    (the one lookup, `llmctl.inference.llamacpp.find_binary`, that serve's llama.cpp engine uses too)."""
    from llmctl.inference.llamacpp import find_binary

    return find_binary(tool)


def llama_cpp_tokenize(path: Path, text: str) -> list[int]:
    """Ids llama.cpp itself gives `text` (exact bytes, no BOS) with this file's tokenizer."""
    cmd = [str(llama_cpp("llama-tokenize")), "-m", str(path), "--stdin", "--ids", "--no-bos", "--no-escape", "--log-disable"]
    r = subprocess.run(cmd, input=text.encode(), capture_output=True, timeout=120)
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip().splitlines() or ["?"]
        raise RuntimeError(f"llama-tokenize failed on {path}: {err[-1]}")
    line = [ln for ln in r.stdout.decode().splitlines() if ln.startswith("[")][-1]
    return [int(x) for x in line.strip("[] ").split(",") if x.strip()]


def llama_cpp_tokenize_check(path: Path, tok) -> dict:
    from llmctl.exporters.gguf_tokenizer import PROBES

    bad = [t for t in PROBES if llama_cpp_tokenize(path, t) != tok(t, add_special_tokens=False)["input_ids"]]
    return {"probes": len(PROBES), "mismatched": len(bad), "first_mismatch": bad[0][:60] if bad else None}
