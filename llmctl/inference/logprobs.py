"""Logprobs: each token's log-probability under the raw logits (before temperature, top-k,
top-p and penalties, as vLLM and OpenAI report them), the likeliest alternatives, the
distribution's entropy, and where each token's text begins. Used by `generate --logprobs`,
serve's engine (sampled and echoed prompt tokens) and explain."""

from __future__ import annotations

from typing import Callable, Sequence


def entropy(lp) -> float:
    """The entropy (nats) of a distribution given as logprobs (a -inf entry adds nothing)."""
    return float(-(lp.exp() * lp).nan_to_num().sum())


def top(lp, k: int) -> list[tuple[int, float]]:
    """The `k` likeliest (id, logprob) of a logprob row, likeliest first."""
    import torch

    if not k:
        return []
    v, i = torch.topk(lp, min(k, lp.numel()))
    return list(zip(i.tolist(), v.tolist()))


def entry(lp, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """(the token's logprob, the `k` likeliest alternatives) in a logprob row."""
    return float(lp[token]), top(lp, k)


def sampled(logits, tokens: Sequence[int], ks: Sequence[int]) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row of raw logits [R, V]: the logprob of its token and its `ks[r]` likeliest
    alternatives, for a whole batch at once: one logsumexp, gather and top-k (no full
    log-softmax written), then one copy to Python."""
    import torch

    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    chosen = logits.gather(1, torch.tensor(list(tokens), device=logits.device).view(-1, 1)) - lse
    k = min(max(ks, default=0), logits.shape[-1])
    if k:
        top_v, top_i = torch.topk(logits, k, dim=-1)
        packed = torch.cat([chosen, top_v - lse, top_i.to(logits.dtype)], dim=1).tolist()  # ids exact below 2^24
    else:
        packed = chosen.tolist()
    return [(p[0], list(zip(map(int, p[k + 1 : k + 1 + n]), p[1 : 1 + n]))) for p, n in zip(packed, ks)]


def prompt_entries(decode: Callable, ids: Sequence[int], first, rows, k: int) -> list[tuple]:
    """(token, logprob, alternatives, text offset) of each prompt token: the first scored by the
    logprob row `first` (None: no number), token m by `rows[m - 1]`; offsets are where each
    token's text begins in `decode(ids)`."""
    t0 = ids[0]
    entries = [(t0, *entry(first, t0, k), 0)] if first is not None else [(t0, None, [], 0)]
    for m, (t, row) in enumerate(zip(ids[1:], rows), 1):
        entries.append((t, *entry(row, t, k), len(decode(ids[:m]))))
    return entries


def token_logprobs(tok, ids: list[int], logits, text: str, k: int) -> list[dict]:
    """Per generated token: its text, logprob and the distribution's entropy (nats) under the
    raw logits, and the `k` likeliest alternatives. Tokens past a stop-string cut (whose text
    is not in the output) are left out."""
    import torch

    out = []
    for i, (t, row) in enumerate(zip(ids, logits)):
        if len(tok.decode(ids[: i + 1], skip_special_tokens=True)) > len(text):
            break
        lp = torch.log_softmax(row.float(), dim=-1)
        rec = {"token": tok.decode([t]), "id": int(t), "logprob": float(lp[t]), "entropy": entropy(lp)}
        if k:
            rec["top"] = [{"token": tok.decode([j]), "id": j, "logprob": x} for j, x in top(lp, k)]
        out.append(rec)
    return out
