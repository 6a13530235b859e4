"""Generation tokens/s: batched (8 prompts at once) vs one at a time vs transformers.pipeline."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _model import quickstart_model
from common import ratio, write_result

PROMPTS = [
    "def read_config(path):", "import os", "class Parser:", "the quick brown fox",
    "for i in range(10):", "return self", "seven wizards quietly judge", "while True:",
]
NEW = 64


def main() -> None:
    import torch
    from transformers import pipeline

    from llmctl.generation import Sampling, generate_batch
    from llmctl.modeling import load_for_inference

    torch.manual_seed(0)
    path = quickstart_model(Path(tempfile.mkdtemp(prefix="bench-gen-")) / "m")
    model, tok = load_for_inference(str(path))
    model.generation_config.eos_token_id = None  # a random model: always generate NEW tokens
    sp = Sampling(max_new_tokens=NEW)
    generate_batch(model, tok, PROMPTS[:2], sp)  # warm-up

    t0 = time.perf_counter()
    res = generate_batch(model, tok, PROMPTS, sp)
    batched = sum(r["completion_tokens"] for r in res) / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    n = 0
    for p in PROMPTS:
        n += generate_batch(model, tok, [p], sp)[0]["completion_tokens"]
    sequential = n / (time.perf_counter() - t0)

    pipe = pipeline("text-generation", model=model, tokenizer=tok, device=model.device)
    pipe(PROMPTS[0], max_new_tokens=4, do_sample=False)
    t0 = time.perf_counter()
    outs = pipe(PROMPTS, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, return_full_text=False)
    n = sum(len(tok(o[0]["generated_text"], add_special_tokens=False)["input_ids"]) for o in outs)
    piped = NEW * len(PROMPTS) / (time.perf_counter() - t0)

    metrics = {"batched_tokens_per_s": round(batched, 1), "sequential_tokens_per_s": round(sequential, 1),
               "pipeline_tokens_per_s": round(piped, 1), "batch": len(PROMPTS), "new_tokens": NEW, "pipeline_decoded_tokens": n}
    write_result("generate", metrics, {
        "generate batched(8) vs sequential": ratio(batched / sequential, 3.0),
        "generate batched(8) vs transformers pipeline": ratio(batched / piped, 1.0),
    })


if __name__ == "__main__":
    main()
