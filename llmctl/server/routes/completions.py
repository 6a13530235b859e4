"""POST /v1/completions: one or more prompts (text or token ids), n choices each, whole or
streamed; logprobs in the legacy shape; echo prepends each prompt to its choices."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from llmctl.inference.context import leading_bos
from llmctl.server.engine import Job
from llmctl.server.jobs import budget, check_request, make_jobs, tokenize, usage
from llmctl.server.rails import checked_input, checked_outputs, guards_for
from llmctl.server.results import event_stream, run_all, stream_events
from llmctl.server.schemas import ApiError, CompletionRequest
from llmctl.server.state import ServerState, server_state

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions

router = APIRouter()


def legacy_logprobs(engine, entries: list, shift: int = 0) -> dict:
    """/v1/completions: tokens, token_logprobs, top_logprobs (the top K plus the chosen
    token, as OpenAI documents), text_offset."""
    dec = engine.token_text
    tops = []
    for t, lp, alts, _ in entries:
        if lp is None:
            tops.append(None)
            continue
        d = {dec(a): v for a, v in alts}
        d.setdefault(dec(t), lp)
        tops.append(d)
    return {
        "tokens": [dec(t) for t, *_ in entries],
        "token_logprobs": [lp for _, lp, _, _ in entries],
        "top_logprobs": tops,
        "text_offset": [off + shift for *_, off in entries],
    }


def _shifted(entries: list, shift: int) -> list:
    """Logprob entries with their text offsets moved past `shift` characters of echoed prompt."""
    return [(t, lp, a, off + shift) for t, lp, a, off in entries]


def prompt_items(prompt: Any) -> list:
    """The request's prompts: a string, a list of strings, token ids or lists of token ids."""
    if isinstance(prompt, list) and not prompt:
        raise ApiError(400, "prompt: the prompt is empty", param="prompt")
    return [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else list(prompt)


def _as_text(st: ServerState, item: Any, ids: list[int]) -> str:
    """A prompt as text, exactly as sent (token-id prompts decoded)."""
    return item if isinstance(item, str) else st.engine.tok.decode(ids[leading_bos(st.engine.tok, ids):])


def prompt_ids(st: ServerState, items: list, rid: str) -> list[list[int]]:
    """Each prompt's token ids; a prompt the input rails changed is tokenized again."""
    prompts = [tokenize(st, x, "prompt") for x in items]
    if st.rails.active("input"):
        for k, (x, ids) in enumerate(zip(items, prompts)):
            text = _as_text(st, x, ids)
            checked = checked_input(st.rails, text, rid, "prompt")
            if checked != text:
                prompts[k] = tokenize(st, checked, "prompt")
    return prompts


@dataclass
class CompletionChoices:
    """The choices of one request, whole (`choice`) or as stream chunks (`chunk`). Choice i
    answers prompt i // n and, with echo, starts with it (and its logprobs, if asked)."""

    engine: Any
    base: dict  # the fields every response or chunk carries (id, object, created, model)
    prompts: list[list[int]]
    jobs: list[Job]
    echoed: list[str]  # per prompt: the text its choices start with ("" without echo)
    n: int
    want: bool  # logprobs asked for
    include_usage: bool = False  # stream_options.include_usage
    opened: set[int] = field(default_factory=set)  # streamed choices that sent their first chunk

    def head(self, i: int) -> tuple[str, list]:
        return self.echoed[i // self.n], (self.jobs[i].prompt_lps or []) if self.want else []

    def choice(self, i: int, text: str, reason: str, lps: list | None) -> dict:
        head, head_lps = self.head(i)
        logprobs = legacy_logprobs(self.engine, head_lps + _shifted(lps, len(head))) if self.want and lps is not None else None
        return {"index": i, "text": head + text, "logprobs": logprobs, "finish_reason": reason}

    def chunk(self, i: int, text: str, finish: str | None, lps: list) -> dict:
        shift = len(self.echoed[i // self.n])
        if i not in self.opened:
            self.opened.add(i)
            head, head_lps = self.head(i)
            text, lps, shift = head + text, head_lps + _shifted(lps, shift), 0
        logprobs = legacy_logprobs(self.engine, lps, shift) if self.want else None
        c = {**self.base, "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        return {**c, "usage": None} if self.include_usage else c

    def usage_chunk(self) -> dict:
        return {**self.base, "choices": [], "usage": usage(self.prompts, self.jobs)}


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    st = server_state(request)
    stops = check_request(st, req)
    items = prompt_items(req.prompt)
    rid, now = "cmpl-" + secrets.token_hex(12), int(time.time())
    prompts = prompt_ids(st, items, rid)
    budgets = [budget(st, req.max_tokens, len(ids), DEFAULT_COMPLETION_TOKENS, "prompt") for ids in prompts]
    jobs = make_jobs(st, prompts, budgets, req, stops, logprobs=req.logprobs, echo=req.echo, stream=bool(req.stream))
    out = CompletionChoices(
        st.engine, {"id": rid, "object": "text_completion", "created": now, "model": st.model_name, "system_fingerprint": None},
        prompts, jobs, [_as_text(st, x, ids) if req.echo else "" for x, ids in zip(items, prompts)], req.n,
        want=req.logprobs is not None, include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )
    if req.stream:
        usage_chunk = out.usage_chunk if out.include_usage else None
        return event_stream(stream_events(jobs, out.chunk, usage_chunk, guards_for(st.rails, jobs, rid)))
    results = checked_outputs(st.rails, await run_all(request, jobs), rid)
    choices = [out.choice(i, text, reason, lps) for i, (text, reason, _, lps) in enumerate(results)]
    # plain JSON values already: a JSONResponse skips FastAPI's jsonable_encoder walk
    return JSONResponse({**out.base, "choices": choices, "usage": usage(prompts, jobs)})
