"""Batched generation with left padding, stop strings and honest finish reasons."""

from __future__ import annotations

from dataclasses import dataclass


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


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut], cut < len(text)


def context_length(model) -> int | None:
    """Positions the model can take; None when its config sets no limit."""
    c = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(c, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def fit_to_context(ids: list[list[int]], max_new_tokens: int, ctx: int | None, bos: int | None = None) -> tuple[list[list[int]], int, list[int]]:
    """(prompts cut from the left, new tokens allowed, tokens cut per prompt).

    Prompt + new tokens must stay within the context: models with learned absolute
    positions (gpt2) crash past it, and rotary ones degrade. New tokens keep up to half of
    the context (all of `max_new_tokens` when it is smaller); a prompt longer than the rest
    loses its beginning (after a leading `bos`, which stays); generation then stops at the
    context.
    """
    if ctx is None:
        return ids, max_new_tokens, [0] * len(ids)
    reserve = min(max_new_tokens, max(ctx // 2, 1))
    keep = ctx - reserve
    cut = [max(len(x) - keep, 0) for x in ids]
    ids = [x[:1] + x[c + 1 :] if c and bos is not None and x[0] == bos else x[c:] for x, c in zip(ids, cut)]
    longest = max((len(x) for x in ids), default=0)
    return ids, min(max_new_tokens, ctx - longest), cut


def generate_batch(model, tok, prompts: list[str], sp: Sampling, streamer=None) -> list[dict]:
    """One dict per (prompt, sequence): text, finish_reason (eos|stop|length), token counts,
    and the batch's decode_seconds (prefill and decoding; not the decoder's one-off build).

    Prompts that would run past the model's context are cut from the left (with a
    warning) and generation stops at the context, never past it.
    """
    import time

    import torch

    from llmctl import console as _console

    if sp.seed is not None:
        torch.manual_seed(sp.seed)
    tok.padding_side = "left"  # decoder-only batching: real tokens end at the same position
    from llmctl.tokenizer import wants_bos, with_bos

    want = wants_bos(tok)  # one BOS rule for training data, generate, eval and serve
    ids = [with_bos(tok, x, want) for x in tok(prompts, add_special_tokens=False)["input_ids"]]
    ctx = context_length(model)
    ids, max_new, cut = fit_to_context(ids, sp.max_new_tokens, ctx, bos=tok.bos_token_id if want else None)
    con = _console.current()
    if any(cut):
        n = sum(1 for c in cut if c)
        con.warn(f"{n} prompt(s) cut from the left (up to {max(cut)} tokens, keeping {len(max(ids, key=len))}) "
                 f"to leave room for new tokens in the model's {ctx}-token context")
    if max_new < sp.max_new_tokens:
        con.warn(f"generating at most {max_new} tokens, not {sp.max_new_tokens}: the model's context is {ctx} tokens")
    enc = tok.pad({"input_ids": ids}, return_tensors="pt", padding=True).to(model.device)
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tok.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    # transformers decodes greedily; the sampler (llmctl/inference/sampling.py) chooses each token as a
    # last logits processor, with per-row generators, exactly as the lean loop and serve do.
    kw = {"max_new_tokens": max_new, "do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    if sp.repetition_penalty != 1.0:
        kw["repetition_penalty"] = 1.0  # the sampler applies the asked one, in place of generation_config's
    if sp.stop:
        kw.update(stop_strings=list(sp.stop), tokenizer=tok)
    if sp.logprobs is not None:
        kw.update(output_logits=True, return_dict_in_generate=True)  # raw logits: before temperature/top-k/top-p
    dec = _lean_for(model, enc["input_ids"].shape[1] + max_new)  # built on first use (its onnxruntime graphs too): setup
    t_decode = time.perf_counter()  # tokens/s counts from here: prefill and decoding, no one-off setup
    step_logits = None
    if dec is not None:
        out, step_logits = lean_generate(dec, tok, enc, sp, max_new, eos_ids, streamer)
    else:
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
        if sp.logprobs is not None:
            out, step_logits = out.sequences, out.logits
    decode_s = time.perf_counter() - t_decode
    n_in = enc["input_ids"].shape[1]
    prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
    results = []
    for row in range(out.shape[0]):
        new = out[row, n_in:].tolist()
        finish = "length"
        for i, t in enumerate(new):
            if t in eos_ids:
                new, finish = new[:i], "eos"
                break
        text = tok.decode(new, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, sp.stop)
        if stopped:
            finish = "stop"
            n_tokens = len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0
        else:
            n_tokens = len(new)
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
                    if cut_at_stop(tok.decode(seqs[r, n_in:], skip_special_tokens=True), sp.stop)[1]:
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


def token_logprobs(tok, ids: list[int], logits, text: str, top: int) -> list[dict]:
    """Per generated token: its text, logprob and the distribution's entropy (nats) under the
    raw logits, and the `top` likeliest alternatives. Tokens past a stop-string cut (whose text
    is not in the output) are left out."""
    import torch

    out = []
    for i, (t, row) in enumerate(zip(ids, logits)):
        if len(tok.decode(ids[: i + 1], skip_special_tokens=True)) > len(text):
            break
        lp = torch.log_softmax(row.float(), dim=-1)
        rec = {"token": tok.decode([t]), "id": int(t), "logprob": float(lp[t]), "entropy": float(-(lp.exp() * lp).nan_to_num().sum())}
        if top:
            v, k = torch.topk(lp, min(top, lp.numel()))
            rec["top"] = [{"token": tok.decode([int(j)]), "id": int(j), "logprob": float(x)} for x, j in zip(v, k)]
        out.append(rec)
    return out
