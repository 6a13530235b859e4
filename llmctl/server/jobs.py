"""From a validated request to engine jobs: the checks both generation endpoints share,
tokenizing, the max_tokens budget, and building and submitting the jobs."""

from __future__ import annotations

import asyncio
from typing import Any

from llmctl.server.engine import Job, QueueFull
from llmctl.server.schemas import UNSUPPORTED, ApiError, _Req
from llmctl.server.state import ServerState
from llmctl.inference.context import encode_one, room


def check_request(st: ServerState, req: _Req) -> list[str]:
    """The request's stop strings, once the model, the engine and the parameters allow it."""
    if req.model != st.model_name:
        raise ApiError(404, f"model '{req.model}' does not exist; this server serves '{st.model_name}'", param="model", code="model_not_found")
    if st.engine.error is not None:
        raise ApiError(500, "the model failed to load; see /health", "server_error")
    if not st.engine.ready.is_set():
        raise ApiError(503, "the model is still loading: retry shortly", "server_error", code="model_loading", headers={"Retry-After": "2"})
    for name, off in UNSUPPORTED.items():
        value = getattr(req, name)
        if not any(value == o and type(value) is type(o) for o in off):
            raise ApiError(400, f"{name} is not supported by this server: leave it out", param=name, code="unsupported_parameter")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise ApiError(400, "stop: at most 4 stop sequences", param="stop")
    return [s for s in stops if s]


def budget(st: ServerState, asked: int | None, prompt_len: int, default: int, param: str) -> int:
    """max_tokens for one prompt: the asked value within the cap and the context."""
    cap = st.max_tokens_cap
    if asked is not None and asked > cap:
        raise ApiError(400, f"max_tokens ({asked}) is above this server's cap of {cap} (serve.max_tokens_cap)", param="max_tokens")
    ctx = st.engine.context_length
    left = room(ctx, prompt_len)  # the context rule generate and eval use (they cut; serve refuses)
    left = cap if left is None else left
    if left < 1 or (asked is not None and asked > left):
        want = asked if asked is not None else 1
        raise ApiError(
            400,
            f"this model's context length is {ctx} tokens; the prompt has {prompt_len} and max_tokens asks for {want}: shorten the prompt or lower max_tokens",
            param=param,
            code="context_length_exceeded",
        )
    return asked if asked is not None else min(default, left)


def tokenize(st: ServerState, prompt: Any, param: str) -> list[int]:
    """Token ids of a text, with BOS first when the tokenizer wants it (the rule generate and
    training use), or a token-id prompt exactly as sent, checked against the vocabulary."""
    engine = st.engine
    if isinstance(prompt, str):
        ids = encode_one(engine.tok, prompt, engine.wants_bos) if prompt else []
    else:
        ids = list(prompt)
        vocab = engine.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"{param}: token id {bad} is outside the vocabulary (0..{vocab - 1})", param=param)
    if not ids:
        raise ApiError(400, f"{param}: the prompt is empty", param=param)
    return ids


def make_jobs(st: ServerState, prompts: list[list[int]], budgets: list[int], req: _Req, stops: list[str], logprobs: int | None = None,
              echo: bool = False, stream: bool = True, images: dict | None = None) -> list[Job]:
    """n jobs per prompt, submitted to the engine (the one place a request becomes jobs)."""
    engine = st.engine
    loop = asyncio.get_running_loop()
    total = len(prompts) * req.n
    if total > engine.max_queue:
        raise ApiError(400, f"this request asks for {total} completions (prompts x n); this server queues at most {engine.max_queue} (serve.max_queue)", param="n")
    if echo and logprobs is not None and not getattr(engine, "prompt_logprobs", True):
        raise ApiError(400, "echo with logprobs needs the prompt's logits, which serve.engine llama.cpp does not return: "
                       "drop echo or logprobs", param="echo")
    jobs = []
    for ids, mt in zip(prompts, budgets):
        for k in range(req.n):
            jobs.append(Job(
                ids, mt, temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k or 0, 0),
                repetition_penalty=req.repetition_penalty, stop=stops,
                # torch seeds are unsigned 64-bit: n > 1 adds k, negative seeds wrap.
                seed=None if req.seed is None else (req.seed + k) % 2**64, loop=loop, out=asyncio.Queue(),
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                logprobs=logprobs, echo_logprobs=echo and logprobs is not None, stream=stream, images=images,
            ))
    try:
        engine.submit(jobs)
    except QueueFull:
        raise ApiError(429, "the server is busy: too many queued requests, retry shortly", "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
    st.metrics.add_prompt_tokens(sum(len(p) for p in prompts) * req.n)
    return jobs


def usage(prompts: list[list[int]], jobs: list[Job]) -> dict:
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(j.tokens) for j in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
