"""A quickstart-sized random llama with a real tokenizer, saved locally (benchmarks only)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def _stdlib_text(max_bytes: int = 3_000_000) -> list[str]:
    import os

    out, n = [], 0
    for f in sorted(Path(os.__file__).parent.glob("*.py")):
        text = f.read_text(encoding="utf-8", errors="replace")
        out.append(text)
        n += len(text)
        if n >= max_bytes:
            break
    return out


def quickstart_model(out: Path, vocab: int = 4096, hidden: int = 128, layers: int = 4, ctx: int = 512) -> Path:
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from conftest import train_tiny_tokenizer

    # The quickstart's own kind of text (the standard library's source), enough of it that the
    # BPE reaches the full vocabulary: the output layer's width is a real share of a decode step.
    tok = train_tiny_tokenizer(_stdlib_text(), out, vocab_size=vocab)
    assert len(tok) == vocab, f"the tokenizer reached {len(tok)} tokens, not {vocab}"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=352, num_hidden_layers=layers,
                      num_attention_heads=4, max_position_embeddings=ctx, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id).save_pretrained(out)
    return out
