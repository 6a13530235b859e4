"""`generate.engine: llama.cpp`: generate's prompts decoded by the llama-server llmctl manages
(llmctl/inference/llamacpp.py), on the run's GGUF export, the one llama.cpp path `serve` uses.

llama.cpp does the forward passes, the KV cache and the sampling (its own sampler, set to
transformers' order; greedy is the same argmax everywhere). Everything else is generate's own
rule, as on the torch path: the prompts' token ids (BOS, the context's left cut), EOS, stop
strings and the text cut at them, finish reasons, token counts and the terminal stream. Several
sequences run at once, one llama-server slot each, so llama.cpp batches them.

Per-token logprobs come from llama.cpp (the raw logits' logprob of each token and its top
alternatives); their `entropy` is null, since llama.cpp does not return the whole distribution
it is computed from.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from llmctl.generation import Sampling, _finish, fit_prompt_ids
from llmctl.inference.llamacpp import LlamaServer, completion_body, stream_tokens
from llmctl.inference.stops import find_stop


def generate_llamacpp(server: LlamaServer, tok, prompts: list[str], sp: Sampling, eos_ids: set[int], ctx: int | None,
                      streamer=None) -> list[dict]:
    """One dict per (prompt, sequence), as `generation.generate_batch` returns them: text,
    finish_reason, prompt_tokens, completion_tokens, decode_seconds (the whole call's: every
    sequence, first request to last token), token_ids, and with `sp.logprobs` their logprobs."""
    import torch

    ids, max_new = fit_prompt_ids(tok, prompts, sp, ctx)
    n_seq = sp.num_return_sequences
    greedy = not sp.do_sample
    rows = [(r, k) for r in range(len(ids)) for k in range(n_seq)]
    if streamer is not None and len(rows) != 1:
        raise ValueError("the terminal stream shows one sequence")

    def one(row_choice: tuple[int, int]) -> list[int]:
        r, k = row_choice
        body = completion_body(ids[r], max_new, temperature=0.0 if greedy else sp.temperature, top_k=sp.top_k or 0,
                               top_p=sp.top_p, repetition_penalty=sp.repetition_penalty, presence_penalty=sp.presence_penalty,
                               frequency_penalty=sp.frequency_penalty, seed=None if sp.seed is None else sp.seed + k,
                               logprobs=sp.logprobs, context=ctx or server.context)
        out: list[int] = []
        lps: list[tuple] = []
        conn = server.connect()
        tokens = stream_tokens(conn, body)
        try:
            if streamer is not None:
                streamer.put(torch.tensor([ids[r]]))
            for t, lp, alts in tokens:
                out.append(t)
                lps.append((lp, alts))
                if streamer is not None:
                    streamer.put(torch.tensor([t]))
                if t in eos_ids:
                    break
                if sp.stop and find_stop(tok.decode(out, skip_special_tokens=True), sp.stop) != -1:
                    break  # closing the connection ends the sequence in llama-server
        finally:
            tokens.close()
            conn.close()
            if streamer is not None:
                streamer.end()
        return out, lps

    t0 = time.perf_counter()
    if len(rows) == 1:
        outs = [one(rows[0])]
    else:
        with ThreadPoolExecutor(max_workers=min(server.slots, len(rows)), thread_name_prefix="llmctl-llamacpp") as ex:
            outs = list(ex.map(one, rows))
    decode_s = time.perf_counter() - t0
    results = []
    for (r, _), (new, lps) in zip(rows, outs):
        text, finish, n_tokens, new = _finish(tok, new, eos_ids, sp.stop)
        rec = {"text": text, "finish_reason": finish, "prompt_tokens": len(ids[r]), "completion_tokens": n_tokens,
               "decode_seconds": decode_s, "token_ids": new}
        if sp.logprobs is not None:
            rec["logprobs"] = _entries(tok, new, lps, text, sp.logprobs)
        results.append(rec)
    return results


def _entries(tok, ids: list[int], lps: list[tuple], text: str, k: int) -> list[dict]:
    """`inference.logprobs.token_logprobs`'s records from llama.cpp's numbers: each token's text,
    logprob and top `k` alternatives, entropy null; tokens past a stop-string cut left out."""
    out = []
    for i, (t, (lp, alts)) in enumerate(zip(ids, lps)):
        if len(tok.decode(ids[: i + 1], skip_special_tokens=True)) > len(text):
            break
        rec = {"token": tok.decode([t]), "id": int(t), "logprob": lp, "entropy": None}
        if k:
            rec["top"] = [{"token": tok.decode([j]), "id": int(j), "logprob": x} for j, x in alts[:k]]
        out.append(rec)
    return out
