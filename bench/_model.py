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


# --------------------------------------------------------------------------- realistic sizes
# Built by llmctl itself (prepare: a BPE trained locally on the builtin corpus; train: from
# scratch), cached outside the git tree so reruns cost nothing: $LLMCTL_BENCH_CACHE, else
# ~/.cache/llmctl-bench/<size>/ (run/ is the llmctl run directory, model/ the HF model).
#   85m:  GPT-2-small-class llama, 12 x 768, GQA 12/4, MLP 2048, 16k BPE, tied: ~88M parameters,
#         trained TRAIN_85M steps (or the time budget) so its perplexity means something.
#   0.5b: shaped like Qwen2.5-0.5B (24 x 896, GQA 14/2, MLP 4864, tied, rope 1e6) with a 32k BPE:
#         ~0.39B parameters, random weights (llmctl's from-scratch builder): only costs are measured.
SIZES = {
    "85m": {"vocab": 16384, "model": {"arch": "llama", "n_layers": 12, "n_heads": 12, "n_kv_heads": 4, "hidden_size": 768,
                                      "intermediate_size": 2048, "context_length": 1024, "tie_embeddings": True},
            "block": 256, "max_bytes": 8_000_000},
    "0.5b": {"vocab": 32768, "model": {"arch": "llama", "n_layers": 24, "n_heads": 14, "n_kv_heads": 2, "hidden_size": 896,
                                       "intermediate_size": 4864, "context_length": 2048, "tie_embeddings": True, "rope_theta": 1_000_000.0},
             "block": 256, "max_bytes": 8_000_000},
}
# The 85M model's training: batch 4 x 256 tokens, bf16 autocast where the CPU has native bf16 matmuls
# (2.4x float32's rate on an AVX-512 machine; master weights stay float32), else float32 (on an
# AVX2-only CPU torch's bf16 matmul is a plain loop: 1024 x 768 x 2048 took 7.7 s against 0.064 s in
# float32), AdamW at 1e-3 with a cosine to 10%; the step count or the
# time budget, whichever ends first (llmctl fits the schedule to the budget). On 2 shared cores a
# step takes tens of seconds: LLMCTL_BENCH_85M_TIME changes the budget, LLMCTL_BENCH_85M_TRAIN (JSON,
# e.g. '{"micro_batch_size": 2, "warmup_steps": 5}') any other train key; info.json records what ran.
TRAIN_85M = {"max_steps": 400, "micro_batch_size": 4, "lr": 1.0e-3, "warmup_steps": 20, "max_time": "55m", "precision": "bf16",
             "eval_every": 50, "eval_batches": 4, "save_every": 50, "log_every": 5}


def cache_root() -> Path:
    import os

    return Path(os.environ.get("LLMCTL_BENCH_CACHE") or Path.home() / ".cache" / "llmctl-bench")


def real_config(size: str, run_dir: Path) -> dict:
    """The llmctl config (as a dict) that builds the `size` model in run_dir."""
    s = SIZES[size]
    d = {"run": {"name": f"bench-{size}", "dir": str(run_dir), "seed": 42},
         "data": {"source": "builtin", "format": "text", "block_size": s["block"], "max_bytes": s["max_bytes"], "validation_fraction": 0.02},
         "tokenizer": {"vocab_size": s["vocab"]},
         "model": dict(s["model"]),
         "eval": {"generation": False, "max_length": s["block"]},
         "export": {"formats": ["hf", "gguf"], "gguf_types": ["q8_0"]}}
    if size == "85m":
        import os

        import json

        from llmctl.train.build import native_bf16

        d["train"] = {**TRAIN_85M, "max_time": os.environ.get("LLMCTL_BENCH_85M_TIME", TRAIN_85M["max_time"]),
                      "precision": "bf16" if native_bf16() else "fp32",
                      **json.loads(os.environ.get("LLMCTL_BENCH_85M_TRAIN") or "{}")}
    return d


def _llmctl(*args: str) -> None:
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "llmctl", *args], check=True, cwd=HERE.parent, env=env)


def real_model(size: str, root: Path | None = None) -> Path:
    """The realistic bench model `size` ("85m" or "0.5b"): an HF directory (weights, tokenizer,
    generation config), built once through llmctl and cached; `info.json` beside it says how."""
    import json
    import time

    import yaml

    if size not in SIZES:
        raise SystemExit(f"unknown bench model size {size!r}: choose from {', '.join(SIZES)}")
    base = (root or cache_root()) / size
    model = base / "model"
    want = real_config(size, base / "run")
    if (base / "info.json").is_file() and (model / "config.json").is_file():
        if json.loads((base / "info.json").read_text()).get("built_from") == want:
            return model
        # built with other settings (e.g. a short training on a loaded machine): build again
        print(f"[bench] {base}: built with other settings than now; rebuilding", flush=True)
        import shutil

        for p in (model, base / "info.json", base / "model.tmp"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    base.mkdir(parents=True, exist_ok=True)
    cfg_path = base / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(want, sort_keys=False))
    info: dict = {"size": size, "config": str(cfg_path), "built_from": want}
    t0 = time.time()
    _llmctl("prepare", str(cfg_path), "-q")
    info["prepare_seconds"] = round(time.time() - t0, 1)
    from llmctl.config import load_config
    from llmctl.rundir import RunDir

    cfg = load_config(cfg_path)
    rd = RunDir(cfg.run.dir)
    if size == "85m":
        t0 = time.time()
        _llmctl("train", str(cfg_path), "-q", "--force")
        info["train_seconds"] = round(time.time() - t0, 1)
        man = json.loads((rd.stage_dir("train") / "manifest.json").read_text())
        recs = [json.loads(x) for x in rd.metrics_path.read_text().splitlines() if x.strip()]
        losses = [r for r in recs if "loss" in r]
        evals = [r for r in recs if "val_loss" in r]
        info["train"] = {"steps": losses[-1]["step"], "tokens": losses[-1].get("tokens"), "final_loss": losses[-1]["loss"],
                         "final_val_loss": evals[-1]["val_loss"] if evals else None, "settings": real_config(size, base / "run")["train"],
                         "headline": man.get("headline") or man.get("metrics")}
        src = rd.model_dir
    else:  # random weights from llmctl's own from-scratch builder: a 0.39B training run is hours here
        from transformers import AutoTokenizer, GenerationConfig

        from llmctl.modeling import build_from_scratch

        tok = AutoTokenizer.from_pretrained(rd.tokenizer_dir)
        src = base / "model.tmp"
        m = build_from_scratch(cfg, tok)
        m.save_pretrained(src)
        tok.save_pretrained(src)
        GenerationConfig(bos_token_id=m.config.bos_token_id, eos_token_id=m.config.eos_token_id, pad_token_id=m.config.pad_token_id).save_pretrained(src)
        del m
    if size == "85m":
        import shutil

        shutil.copytree(src, base / "model.tmp", dirs_exist_ok=True)
        src = base / "model.tmp"
    src.rename(model)
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model)
    info["vocab_size"] = c.vocab_size
    info["params"] = params_of(model)
    (base / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return model


def params_of(model_dir: Path | str) -> int:
    """Parameter count of an HF model directory without loading it (safetensors headers; tied
    weights counted once, as `model.parameters()` does)."""
    import json
    import struct

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                size = 1
                for d in v["shape"]:
                    size *= d
                total += size
    return total


def vocab_variant(size: str, vocab: int) -> Path:
    """The `size` model's architecture with a `vocab`-token output layer, random weights, the same
    tokenizer (its ids are a subset): for measuring what the vocabulary costs, not for quality."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base = real_model(size)
    out = base.parent / f"model-vocab{vocab}"
    if (out / "config.json").is_file():
        return out
    c = AutoConfig.from_pretrained(base)
    c.vocab_size = vocab
    torch.manual_seed(0)
    tmp = out.with_name(out.name + ".tmp")
    AutoModelForCausalLM.from_config(c, dtype=torch.float32).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    GenerationConfig.from_pretrained(base).save_pretrained(tmp)
    tmp.rename(out)
    return out


def real_info(size: str) -> dict:
    """info.json of a built realistic model (how it was built, its training, parameter count)."""
    import json

    real_model(size)
    return json.loads((cache_root() / size / "info.json").read_text())


if __name__ == "__main__":  # python bench/_model.py 85m 0.5b: build (or find) the realistic models
    import json

    for s in sys.argv[1:] or list(SIZES):
        print(s, real_model(s), json.dumps(real_info(s)), flush=True)
