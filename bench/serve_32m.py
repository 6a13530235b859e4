"""Serving a 32M-parameter llama on the torch engine, where its decode runs as onnxruntime
graphs (the folded pass, llmctl/inference/lean_ort.py: models up to LeanDecoder.FUSE_MAX_PARAMS),
side by side with bare llama-server on the f32 GGUF of the same weights, alternating rounds.

Two `llmctl serve` sides: as shipped (the prompt graph's threads sleep between its runs) and
with `LLMCTL_ORT_PREFILL_SPIN=1` (they spin for a while after each run, onnxruntime's default,
as before). The prompt and step graphs are two sessions with threads of their own; with a
prompt arriving every few steps, the prompt session's spinning threads took the cores the
next steps needed. At 1, 4 and 8 clients;
the model is random (8 layers, hidden 512, GQA 8/4, intermediate 1408, the 85M bench model's
16k BPE): speed does not depend on what the weights learned.

    .venv/bin/python bench/serve_32m.py [--rounds N]   # writes bench/results/serve_32m.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path


from common import machine, ratio, write_result

CACHE = Path(os.environ.get("LLMCTL_BENCH_CACHE", Path.home() / ".cache" / "llmctl-bench")) / "serve-32m"
SIDES = {"prompt_graph_asleep": {}, "prompt_graph_spinning": {"LLMCTL_ORT_PREFILL_SPIN": "1"}}


def model_32m() -> tuple[Path, Path]:
    """The random 32M llama and its f32 GGUF (written by llmctl's exporter), cached."""
    import torch
    import transformers

    from realsize import model_85m

    model_dir, gguf = CACHE / "model", CACHE / "gguf" / "model-f32.gguf"
    if not (model_dir / "config.json").is_file():
        tok = transformers.AutoTokenizer.from_pretrained(model_85m())
        cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        part = CACHE / "model.part"
        transformers.LlamaForCausalLM(cfg).save_pretrained(part)
        tok.save_pretrained(part)
        part.rename(model_dir)
    if not gguf.is_file():
        from llmctl.exporters import gguf as gguf_x
        from llmctl.modeling import load_for_inference

        model, tok = load_for_inference(str(model_dir))
        part = CACHE / "gguf.part"
        part.mkdir(parents=True, exist_ok=True)
        gguf_x.write(model, tok, part, "f32", "bench")
        gguf.parent.mkdir(parents=True, exist_ok=True)
        (part / gguf.name).rename(gguf)
    return model_dir, gguf


def main() -> None:
    import realsize as R
    from serve import phases

    from llmctl.inference.lean import LeanDecoder
    from llmctl.inference.llamacpp import find_binary
    from llmctl.modeling import load_for_inference

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    at_start = machine()
    model_dir, gguf = model_32m()
    model, _ = load_for_inference(str(model_dir))
    n_params = sum(p.numel() for p in model.parameters())
    dec = LeanDecoder(model)
    path = "folded + onnxruntime" if dec.ort is not None else f"not onnxruntime ({dec.ort_skipped or dec.fast_skipped})"
    del model, dec
    binary = find_binary("llama-server")
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-32m-"))
    procs, urls = {}, {}
    try:
        for name, env in SIDES.items():
            procs[name], urls[name] = R._llmctl_serve(model_dir, tmp, name, env=env)
        if binary is not None:
            procs["llama_server"], urls["llama_server"] = R._bare_llama_server(binary, gguf, 1024)
        extra = {"llama_server": {"ignore_eos": True}}  # every request makes MAX_TOKENS there too
        for name, url in urls.items():
            phases(url, "bench", extra.get(name, {}), [("warm", 4, 8, {})])
        tps: dict = {name: {c: [] for c, _ in R.CLIENTS} for name in urls}
        for r in range(args.rounds):
            for c, n in R.CLIENTS:
                order = list(urls) if r % 2 == 0 else list(reversed(urls))
                for name in order:
                    tps[name][c].append(phases(urls[name], "bench", extra.get(name, {}), [("p", c, n, {})])["p"]["tokens_per_s"])
                print(f"[serve_32m] round {r + 1}, {c} client(s): " + ", ".join(f"{k} {tps[k][c][-1]} tok/s" for k in urls)
                      + f" (load {R.load()})", file=sys.stderr, flush=True)
    finally:
        for p in procs.values():
            R._stop(p)
    res, ratios = {}, {}
    for c, _ in R.CLIENTS:
        row = {f"{name}_tokens_per_s": round(statistics.median(v[c]), 1) for name, v in tps.items()}
        row["asleep_vs_spinning"] = round(statistics.median(a / b for a, b in zip(tps["prompt_graph_asleep"][c], tps["prompt_graph_spinning"][c])), 3)
        ratios[f"32M serve {c} client(s): prompt graph's threads asleep vs spinning between runs (torch engine)"] = ratio(row["asleep_vs_spinning"], None)
        if "llama_server" in tps:
            row["vs_llama_server"] = round(statistics.median(a / b for a, b in zip(tps["prompt_graph_asleep"][c], tps["llama_server"][c])), 3)
            ratios[f"32M serve {c} client(s) vs llama-server f32 (torch engine)"] = ratio(row["vs_llama_server"], None)
        res[f"clients_{c}"] = {**row, "rounds": {name: v[c] for name, v in tps.items()}}
    metrics = {"model": "llama 8 layers, hidden 512, GQA 8/4, intermediate 1408, 16k BPE, f32, random weights", "decode_path": path,
               "rounds": args.rounds, "threads": R.THREADS, "machine": at_start, "load_avg_1m_end": R.load(),
               "llama_server": str(binary) if binary else "not found ($LLAMA_CPP_BIN, PATH): no llama-server side", **res}
    write_result("serve_32m", metrics, ratios, model_params=n_params)


if __name__ == "__main__":
    main()
