"""Generation tokens/s: llmctl batched vs one at a time vs transformers.pipeline (same batch
size), and one prompt streamed the way `llmctl generate` does on a terminal vs a bare
`model.generate` on the same prompt.

Greedy, EOS disabled so every side makes exactly NEW tokens per prompt; each figure is the
best of ROUNDS, the sides alternating.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path

from _model import quickstart_model
from common import machine, ratio, write_result

PROMPTS = [
    "def read_config(path):", "import os", "class Parser:", "the quick brown fox",
    "for i in range(10):", "return self", "seven wizards quietly judge", "while True:",
]
NEW = 64
ROUNDS = 3


def main() -> None:
    import torch
    from transformers import TextStreamer, pipeline

    from llmctl.generation import Sampling, generate_batch
    from llmctl.modeling import load_for_inference

    torch.manual_seed(0)
    path = quickstart_model(Path(tempfile.mkdtemp(prefix="bench-gen-")) / "m")
    model, tok = load_for_inference(str(path))
    model.generation_config.eos_token_id = None  # a random model: always generate NEW tokens
    sp = Sampling(max_new_tokens=NEW)
    generate_batch(model, tok, PROMPTS[:2], sp)  # warm-up
    tok.padding_side = "left"
    pipe = pipeline("text-generation", model=model, tokenizer=tok, device=model.device)
    pipe(PROMPTS[:2], max_new_tokens=4, do_sample=False, batch_size=len(PROMPTS))

    def batched():
        res = generate_batch(model, tok, PROMPTS, sp)
        return sum(r["completion_tokens"] for r in res)

    def sequential():
        return sum(generate_batch(model, tok, [p], sp)[0]["completion_tokens"] for p in PROMPTS)

    def piped():
        outs = pipe(PROMPTS, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, return_full_text=False, batch_size=len(PROMPTS))
        assert len(outs) == len(PROMPTS)
        return NEW * len(PROMPTS)

    def single_llmctl():  # what `llmctl generate -p PROMPT` runs on a terminal: streamed
        with contextlib.redirect_stdout(io.StringIO()):
            res = generate_batch(model, tok, [PROMPTS[0]], sp, streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
        return res[0]["completion_tokens"]

    def single_bare():
        enc = tok(PROMPTS[0], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)
        return out.shape[1] - enc["input_ids"].shape[1]

    def single_static():  # transformers' own faster path: generate with its static cache (#25)
        enc = tok(PROMPTS[0], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id, cache_implementation="static")
        return out.shape[1] - enc["input_ids"].shape[1]

    single_static()  # warm-up
    sides = {"batched": batched, "sequential": sequential, "pipeline": piped, "single_llmctl": single_llmctl, "single_generate": single_bare,
             "single_generate_static": single_static}
    runs: dict[str, list[float]] = {k: [] for k in sides}
    for k in range(ROUNDS):
        for name, fn in (sides.items() if k % 2 == 0 else reversed(sides.items())):
            t0 = time.perf_counter()
            n = fn()
            runs[name].append(n / (time.perf_counter() - t0))
    best = {k: round(max(v), 1) for k, v in runs.items()}
    metrics = {f"{k}_tokens_per_s": v for k, v in best.items()}
    metrics.update({"model_params": sum(p.numel() for p in model.parameters()), "batch": len(PROMPTS), "pipeline_batch_size": len(PROMPTS), "new_tokens": NEW, "rounds": ROUNDS,
                    "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()}, "machine": machine()})
    write_result("generate", metrics, {
        "generate batched(8) vs sequential": ratio(best["batched"] / best["sequential"], 3.0),
        "generate batched(8) vs transformers pipeline(batch_size=8)": ratio(best["batched"] / best["pipeline"], 0.9),
        # the lean decode path (llmctl/inference/lean.py) against transformers generate: issue 19 asks for 2x
        "generate one prompt streamed vs bare model.generate": ratio(best["single_llmctl"] / best["single_generate"], 2.0),
        # #25: the lean path stays only where it beats transformers' own best path (static cache too)
        "generate one prompt streamed vs model.generate static cache": ratio(best["single_llmctl"] / best["single_generate_static"], 1.0),
    })


if __name__ == "__main__":
    main()
