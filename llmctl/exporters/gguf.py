"""GGUF for llama.cpp and Ollama (llama architecture), tokenizer embedded, via `gguf`."""

from __future__ import annotations

import json
from pathlib import Path

from llmctl.errors import ConfigError

SUPPORTED = ("llama",)
# Relative to the largest reference logit: rounding of each type, not a wrong tensor.
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "q8_0": 6e-2}


def check_supported(model) -> None:
    mt = model.config.model_type
    if mt not in SUPPORTED:
        raise ConfigError(
            f"export.formats: gguf supports {', '.join(SUPPORTED)} models, not '{mt}': "
            "drop gguf from export.formats (hf and onnx work for every architecture)"
        )


def _permute(w, n_head: int):
    """HF q/k rows -> llama.cpp's rotary layout (interleaved halves per head)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _tensors(model):
    """(gguf name, float32 numpy array) in llama.cpp's naming."""
    c = model.config
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    n_kv = c.num_key_value_heads or c.num_attention_heads
    yield "token_embd.weight", sd["model.embed_tokens.weight"]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        yield f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"]
        yield f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads)
        yield f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], n_kv)
        yield f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"]
        yield f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"]
        yield f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"]
        yield f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"]
        yield f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"]
        yield f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"]
    yield "output_norm.weight", sd["model.norm.weight"]
    if not c.tie_word_embeddings:  # tied: llama.cpp reuses token_embd
        yield "output.weight", sd["lm_head.weight"]


def write(model, tok, out: Path, qtype: str, name: str) -> Path:
    import gguf
    import numpy as np

    check_supported(model)
    c = model.config
    path = out / f"model-{qtype}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads or c.num_attention_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
    w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    w.add_file_type(ftype)
    _add_tokenizer(w, tok, c.vocab_size)
    for tname, arr in _tensors(model):
        if arr.ndim == 1 or qtype == "f32":  # norms stay f32, as llama.cpp expects
            w.add_tensor(tname, arr.astype(np.float32))
        elif qtype == "f16":
            w.add_tensor(tname, arr.astype(np.float16))
        else:
            q = gguf.quants.quantize(arr.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(tname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_tokenizer(w, tok, vocab_size: int) -> None:
    import gguf

    tj = json.loads(tok.backend_tokenizer.to_str())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError(f"export gguf: only byte-level BPE tokenizers can be embedded (this one is {model.get('type')})")
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    special = set(tok.all_special_ids)
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:  # embedding rows beyond the tokenizer (padded vocab)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    if tok.pad_token_id is not None:
        w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    if getattr(tok, "chat_template", None):
        w.add_chat_template(tok.chat_template)


def verify(path: Path, ref, ids, mask, qtype: str) -> tuple[float, float]:
    """Read back with gguf's reader (shapes, count) and transformers' GGUF loader (logits)."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from llmctl.exporters.common import max_diff, reference_logits

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the GGUF loader's tqdm bar would clutter our output
    reader = gguf.GGUFReader(str(path))
    if not reader.tensors:
        raise ValueError(f"{path}: no tensors")
    m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    diff = max_diff(reference_logits(m, ids, mask), ref, mask)
    scale = max(1.0, float(ref.abs().max()))
    return diff, TOLERANCE[qtype] * scale
