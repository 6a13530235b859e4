"""The one sampling step of everything in llmctl that decodes (`generate`, eval's generations,
the serve engine): the next token of each row from its logits.

Rows are processed by transformers' own logits processors in `generate`'s order: the
repetition penalty (over prompt and output, as transformers and vLLM apply it), then
OpenAI's presence and frequency penalties (over the output only), then temperature, top-k
and top-p; then greedy (temperature 0) takes the argmax, sampling draws from the softmax.
Each seeded row draws from its own CPU `torch.Generator`, so a seeded row gets the same
tokens alone or in any batch, on any device; unseeded rows draw from torch's global one.
Rows with the same settings are processed together (every step is row-wise, so that changes
no number).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy (the argmax after the penalties)
    top_k: int = 0  # 0 (or below): off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # transformers' (>1 discourages every token seen, prompt included)
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token of the output so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the output so far

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)


def generator(seed: int | None, choice: int = 0) -> torch.Generator | None:
    """The CPU generator of a row: seeded with `seed + choice` (choice k of a prompt asked for
    several; torch seeds are unsigned 64-bit, so negative seeds wrap), None without a seed."""
    if seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed((seed + choice) % 2**64)


@lru_cache(maxsize=256)
def _warpers(temperature: float, top_k: int, top_p: float):
    """transformers' warpers for these settings, in `generate`'s order (built once)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(temperature)))
    if top_k and top_k > 0:
        procs.append(TopKLogitsWarper(top_k=int(top_k)))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=float(top_p)))
    return procs


def _penalize(x, p: SamplingParams, prompts: list[Sequence[int]], outputs: list[Sequence[int]]):
    """x [G, V] (rows with settings p) after the repetition, presence and frequency penalties."""
    if p.repetition_penalty != 1.0:
        from transformers import RepetitionPenaltyLogitsProcessor

        V = x.shape[-1]
        seen = [list(a) + list(b) for a, b in zip(prompts, outputs)]
        n = max(len(s) for s in seen)
        # left-padded with V: transformers' processor drops ids past the vocabulary
        ids = torch.tensor([[V] * (n - len(s)) + s for s in seen], dtype=torch.long, device=x.device)
        x = RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty))(ids, x)
    if p.presence_penalty or p.frequency_penalty:
        x = x.clone()
        for r, out in enumerate(outputs):
            if len(out):
                ids, counts = torch.tensor(list(out), device=x.device).unique(return_counts=True)
                x[r, ids] -= p.frequency_penalty * counts.to(x.dtype) + p.presence_penalty
    return x


def next_tokens(logits, params: Sequence[SamplingParams | None], prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                generators: Sequence[torch.Generator | None], skip: int = 0) -> list[int]:
    """The next token of each row. logits [B, V] float (raw); per row: its settings (None: a
    row that takes no token, given `skip`), its prompt and its output so far (token ids, for
    the penalties), and its generator."""
    B = logits.shape[0]
    out = [skip] * B
    groups: dict[SamplingParams, list[int]] = {}
    plain = []
    for i, p in enumerate(params):
        if p is None:
            continue
        if p.greedy and not p.penalized:
            plain.append(i)
        else:
            groups.setdefault(p, []).append(i)
    if plain:
        # numpy's argmax on CPU logits costs a fraction of torch's call (the same first maximum)
        best = (logits.numpy() if logits.device.type == "cpu" else logits).argmax(-1).tolist()
        for i in plain:
            out[i] = best[i]
    for p, rows in groups.items():
        x = logits if len(rows) == B else logits[rows]
        x = _penalize(x, p, [prompts[i] for i in rows], [outputs[i] for i in rows])
        if p.greedy:
            for i, t in zip(rows, x.argmax(-1).tolist()):
                out[i] = t
            continue
        warp = _warpers(p.temperature, p.top_k, p.top_p)
        x = warp(None, x) if warp else x
        probs = torch.softmax(x, dim=-1).cpu()
        for k, i in enumerate(rows):
            out[i] = int(torch.multinomial(probs[k], 1, generator=generators[i]))
    return out


class DrawProcessor:
    """`next_tokens` as the last logits processor of transformers' `generate` run greedily:
    it draws each row's token and leaves it the only finite score, so `generate`'s argmax
    takes it. Rows are [prompt padding | prompt | output]; `starts` is where each row's prompt
    begins, `n_prompt` where the output begins."""

    def __init__(self, params: Sequence[SamplingParams], generators, starts: Sequence[int], n_prompt: int):
        self.params, self.generators, self.starts, self.n_prompt = list(params), list(generators), list(starts), n_prompt

    def __call__(self, input_ids, scores):
        rows = input_ids.tolist() if any(p.penalized for p in self.params) else [[]] * len(self.params)
        prompts = [r[s : self.n_prompt] for r, s in zip(rows, self.starts)]
        outputs = [r[self.n_prompt :] for r in rows]
        tokens = next_tokens(scores.float(), self.params, prompts, outputs, self.generators)
        one = torch.full_like(scores, float("-inf"))
        one[torch.arange(scores.shape[0]), torch.tensor(tokens, device=scores.device)] = 0.0
        return one
