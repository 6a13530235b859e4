"""Batched generation with left padding, stop strings and honest finish reasons, on the
inference core (llmctl/inference/): its sampler, stop rule, logprobs, context and BOS rules,
and its lean decode path where it covers the model."""

from __future__ import annotations

from dataclasses import dataclass

from llmctl.inference.context import context_length, encode, fit_to_context
from llmctl.inference.logprobs import token_logprobs
from llmctl.inference.stops import cut_at_stop, find_stop


@dataclass
class Sampling:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    num_return_sequences: int = 1
    seed: int | None = None  # return sequence k of a prompt draws from its own generator seeded seed + k
    logprobs: int | None = None  # None: off; K >= 0: per-token logprob and entropy, plus the top K alternatives
    presence_penalty: float = 0.0  # OpenAI's, over the output (as the server takes them)
    frequency_penalty: float = 0.0

    def params(self):
        """The sampler's settings (llmctl/inference/sampling.py): greedy is temperature 0."""
        from llmctl.inference.sampling import SamplingParams

        return SamplingParams(
            temperature=self.temperature if self.do_sample else 0.0, top_k=self.top_k or 0, top_p=self.top_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
        )

    def generators(self, rows: int) -> list:
        """Each row's generator: rows are prompts x return sequences, choice k of a prompt seeded seed + k."""
        from llmctl.inference.sampling import generator

        return [generator(self.seed, r % self.num_return_sequences) for r in range(rows)]


def generate_batch(model, tok, prompts: list[str], sp: Sampling, streamer=None) -> list[dict]:
    """One dict per (prompt, sequence): text, finish_reason (eos|stop|length), token counts,
    and the batch's decode_seconds (prefill and decoding; not the decoder's one-off build).

    Prompts that would run past the model's context are cut from the left (with a
    warning) and generation stops at the context, never past it.
    """
    import time

    import torch

    if sp.seed is not None:
        torch.manual_seed(sp.seed)
    enc, max_new = _fit_prompts(model, tok, prompts, sp)
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tok.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    dec = _lean_for(model, enc["input_ids"].shape[1] + max_new)  # built on first use (its onnxruntime graphs too): setup
    t_decode = time.perf_counter()  # tokens/s counts from here: prefill and decoding, no one-off setup
    if dec is not None:
        out, step_logits = lean_generate(dec, tok, enc, sp, max_new, eos_ids, streamer)
    else:
        out, step_logits = _hf_generate(model, tok, enc, sp, max_new, eos_ids, streamer)
    decode_s = time.perf_counter() - t_decode
    n_in = enc["input_ids"].shape[1]
    prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
    results = []
    for row in range(out.shape[0]):
        text, finish, n_tokens, new = _finish(tok, out[row, n_in:].tolist(), eos_ids, sp.stop)
        rec = {
            "text": text,
            "finish_reason": finish,
            "prompt_tokens": int(prompt_lens[row // sp.num_return_sequences]),
            "completion_tokens": n_tokens,
            "decode_seconds": decode_s,  # the whole batch's (shared by its rows)
            "token_ids": new,  # generated, up to EOS (past a stop string's cut too)
        }
        if step_logits is not None:
            rec["logprobs"] = token_logprobs(tok, new, [step[row] for step in step_logits[: len(new)]], text, sp.logprobs)
        results.append(rec)
    return results


def _fit_prompts(model, tok, prompts: list[str], sp: Sampling):
    """(the prompts as the model sees them, left-padded on its device; the new tokens allowed):
    BOS by the one rule, cut from the left to fit the context, with a warning when cut."""
    tok.padding_side = "left"  # decoder-only batching: real tokens end at the same position
    ids, max_new = fit_prompt_ids(tok, prompts, sp, context_length(model))
    return tok.pad({"input_ids": ids}, return_tensors="pt", padding=True).to(model.device), max_new


def fit_prompt_ids(tok, prompts: list[str], sp: Sampling, ctx: int | None) -> tuple[list[list[int]], int]:
    """(each prompt's token ids, the new tokens allowed): BOS by the one rule, cut from the left to
    fit the `ctx`-token context, with a warning when cut."""
    from llmctl import console as _console

    ids, want = encode(tok, prompts)  # one BOS rule for training data, generate, eval and serve
    ids, max_new, cut = fit_to_context(ids, sp.max_new_tokens, ctx, bos=tok.bos_token_id if want else None)
    con = _console.current()
    if any(cut):
        n = sum(1 for c in cut if c)
        con.warn(f"{n} prompt(s) cut from the left (up to {max(cut)} tokens, keeping {len(max(ids, key=len))}) "
                 f"to leave room for new tokens in the model's {ctx}-token context")
    if max_new < sp.max_new_tokens:
        con.warn(f"generating at most {max_new} tokens, not {sp.max_new_tokens}: the model's context is {ctx} tokens")
    return ids, max_new


def _hf_generate(model, tok, enc, sp: Sampling, max_new: int, eos_ids: set[int], streamer=None):
    """transformers' `generate`, run greedily, each token chosen by the sampler
    (llmctl/inference/sampling.py) as a last logits processor with per-row generators, exactly
    as the lean loop and serve do. Returns (ids [rows, prompt + new], raw logits per step or None)."""
    import torch

    kw = {"max_new_tokens": max_new, "do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    if sp.repetition_penalty != 1.0:
        kw["repetition_penalty"] = 1.0  # the sampler applies the asked one, in place of generation_config's
    if sp.stop:
        kw.update(stop_strings=list(sp.stop), tokenizer=tok)
    if sp.logprobs is not None:
        kw.update(output_logits=True, return_dict_in_generate=True)  # raw logits: before temperature/top-k/top-p
    inputs = {k: v.repeat_interleave(sp.num_return_sequences, dim=0) for k, v in enc.items()}
    params = sp.params()
    if not (params.greedy and not params.penalized):
        from llmctl.inference.sampling import DrawProcessor

        n_in = inputs["input_ids"].shape[1]
        starts = (n_in - inputs["attention_mask"].sum(dim=1)).tolist()
        rows = len(starts)
        kw["logits_processor"] = [DrawProcessor([params] * rows, sp.generators(rows), starts, n_in)]
    with torch.no_grad():
        out = model.generate(**inputs, pad_token_id=tok.pad_token_id, eos_token_id=list(eos_ids) or None, streamer=streamer, **kw)
    return (out.sequences, out.logits) if sp.logprobs is not None else (out, None)


def _finish(tok, new: list[int], eos_ids: set[int], stops) -> tuple[str, str, int, list[int]]:
    """(text: up to EOS, cut at the first stop string; finish reason; completion tokens; the
    token ids up to EOS) of one generated sequence."""
    finish = "length"
    for i, t in enumerate(new):
        if t in eos_ids:
            new, finish = new[:i], "eos"
            break
    text, stopped = cut_at_stop(tok.decode(new, skip_special_tokens=True), stops)
    if not stopped:
        return text, finish, len(new), new
    return text, "stop", len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0, new


# generation_config settings that add logits processors `lean_generate` does not apply: a model
# that sets any of them (a hub model's generation_config.json) is decoded by `generate`.
_EXTRA_PROCESSORS = {
    "repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "sequence_bias": (None,),
    "min_length": (None, 0), "min_new_tokens": (None, 0), "encoder_repetition_penalty": (None, 1.0), "num_beams": (None, 1),
    "exponential_decay_length_penalty": (None,), "renormalize_logits": (None, False), "min_p": (None,), "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "top_h": (None,), "watermarking_config": (None,),
    "guidance_scale": (None, 1.0), "diversity_penalty": (None, 0.0), "constraints": (None,), "force_words_ids": (None,),
}


def _lean_for(model, total_len: int):
    """The lean decoder when it reproduces `model.generate` here exactly, else None."""
    from llmctl.inference.lean import decoder_for, tell_skipped

    dec = decoder_for(model)
    if dec is None:
        return None
    if dec.window is not None and total_len > dec.window:
        tell_skipped(model, "lean decoding", f"prompt and new tokens would cross its {dec.window}-token sliding window",
                     "decoding with transformers")
        return None
    gc = model.generation_config
    extra = [k for k, ok in _EXTRA_PROCESSORS.items() if getattr(gc, k, None) not in ok]
    if extra:
        tell_skipped(model, "lean decoding", f"its generation_config sets {', '.join(extra)}", "decoding with transformers")
        return None
    return dec


def lean_generate(dec, tok, enc, sp: Sampling, max_new: int, eos_ids: set[int], streamer=None):
    """`model.generate` (stop strings, EOS) on the lean forward pass, each token chosen by the
    sampler `generate` and serve use (llmctl/inference/sampling.py), so a seeded run returns the tokens
    transformers' `generate` path returns. Returns (ids [rows, prompt + new], raw logits per
    step or None)."""
    import torch

    from llmctl.inference.sampling import next_tokens

    ids, mask = enc["input_ids"], enc["attention_mask"]
    if sp.num_return_sequences > 1:
        ids = ids.repeat_interleave(sp.num_return_sequences, dim=0)
        mask = mask.repeat_interleave(sp.num_return_sequences, dim=0)
    B, n_in = ids.shape
    params, gens = [sp.params()] * B, sp.generators(B)
    prompts = [r[n_in - int(m.sum()) :] for r, m in zip(ids.tolist(), mask)] if params[0].penalized else [[]] * B
    outputs: list[list[int]] = [[] for _ in range(B)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=ids.device) if eos_ids else None
    cache = dec.new_cache()
    padded = not bool(mask.all())
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = dec.forward(ids, pos, cache, mask=mask if padded else None)
    pos = pos[:, -1:] + 1
    if streamer is not None:
        streamer.put(ids.cpu())
    unfinished = torch.ones(B, dtype=torch.long, device=ids.device)
    seqs, raw = ids, ([] if sp.logprobs is not None else None)
    texts_done = [False] * B
    for step in range(max_new):
        if raw is not None:
            raw.append(logits)
        drawn = next_tokens(logits, params, prompts, outputs, gens)
        for o, t in zip(outputs, drawn):
            o.append(t)
        nxt = torch.tensor(drawn, dtype=torch.long, device=ids.device)
        if eos is not None:
            nxt = nxt * unfinished + pad * (1 - unfinished)
        seqs = torch.cat([seqs, nxt[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(nxt.cpu())
        if eos is not None:
            unfinished = unfinished & ~torch.isin(nxt, eos)
        if sp.stop:
            for r in range(B):
                if not texts_done[r] and unfinished[r]:
                    if find_stop(tok.decode(seqs[r, n_in:], skip_special_tokens=True), sp.stop) != -1:
                        texts_done[r] = True
                        unfinished[r] = 0
        if step == max_new - 1 or not bool(unfinished.any()):
            break
        if padded:
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=mask.device)], dim=1)
        logits = dec.forward(nxt[:, None], pos, cache, mask=mask if padded else None)
        pos = pos + 1
    if streamer is not None:
        streamer.end()
    return seqs, raw
