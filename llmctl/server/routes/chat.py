"""POST /v1/chat/completions: a conversation through the model's chat template, n choices,
whole or streamed; logprobs in the chat shape."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from llmctl.server.engine import Job
from llmctl.server.images import has_images, image_prompt
from llmctl.server.jobs import budget, check_request, make_jobs, tokenize, usage
from llmctl.server.rails import checked_input, checked_outputs, guards_for
from llmctl.server.results import event_stream, run_all, stream_events
from llmctl.server.schemas import ApiError, ChatRequest
from llmctl.server.state import ServerState, server_state

router = APIRouter()


def chat_logprobs(engine, entries: list, top: int) -> dict:
    """/v1/chat/completions: content[] of {token, logprob, bytes, top_logprobs[]}."""
    dec = engine.token_text

    def one(t: int, lp: float) -> dict:
        return {"token": dec(t), "logprob": lp, "bytes": engine.token_bytes(t)}

    return {"content": [{**one(t, lp), "top_logprobs": [one(a, v) for a, v in alts[:top]]} for t, lp, alts, _ in entries], "refusal": None}


def asked_tokens(req: ChatRequest) -> int | None:
    """max_completion_tokens, or its older name max_tokens (both only if they agree)."""
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens differ: send one of them", param="max_completion_tokens")
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def conversation_ids(st: ServerState, req: ChatRequest, rid: str) -> list[int]:
    """The conversation's token ids: each message through the input rails, then the template."""
    msgs = [{"role": m.role, "content": checked_input(st.rails, m.text(), rid, f"messages[{i}].content")} for i, m in enumerate(req.messages)]
    try:
        text = st.engine.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises on conversations the template refuses
        raise ApiError(400, f"messages: the chat template rejected this conversation: {e}", param="messages") from None
    return tokenize(st, text, "messages")


@dataclass
class ChatChoices:
    """The choices of one chat request, whole (`choice`) or as stream chunks (`chunk`)."""

    engine: Any
    base: dict  # the fields every response or chunk carries (id, object, created, model)
    ids: list[int]
    jobs: list[Job]
    want: bool  # logprobs asked for
    top: int  # top_logprobs
    include_usage: bool = False  # stream_options.include_usage
    started: set[int] = field(default_factory=set)  # streamed choices that sent their role

    def _logprobs(self, lps: list | None) -> dict | None:
        return chat_logprobs(self.engine, lps, self.top) if self.want and lps is not None else None

    def choice(self, i: int, text: str, reason: str, refusal: str | None, lps: list | None) -> dict:
        return {"index": i, "message": {"role": "assistant", "content": text, "refusal": refusal}, "logprobs": self._logprobs(lps), "finish_reason": reason}

    def chunk(self, i: int, text: str, finish: str | None, lps: list) -> dict:
        delta: dict[str, Any] = {}
        if i not in self.started:
            self.started.add(i)
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        c = {**self.base, "choices": [{"index": i, "delta": delta, "logprobs": self._logprobs(lps or None), "finish_reason": finish}]}
        return {**c, "usage": None} if self.include_usage else c

    def usage_chunk(self) -> dict:
        return {**self.base, "choices": [], "usage": usage([self.ids], self.jobs)}


@router.post("/v1/chat/completions")
async def chat(req: ChatRequest, request: Request):
    st = server_state(request)
    stops = check_request(st, req)
    asked = asked_tokens(req)
    images = None
    if has_images(req):  # image_url parts: llmctl/server/images.py
        rid, now = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        # Off the event loop: fetching (serve.allow_remote_images), decoding and the processor take
        # milliseconds to seconds, and every other client's stream waits while the loop is held.
        ids, images = await run_in_threadpool(image_prompt, st, req, rid)
    else:
        if not getattr(st.engine.tok, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions, or set tokenizer.chat_template and re-run prepare and train", param="messages", code="no_chat_template")
        rid, now = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        ids = conversation_ids(st, req, rid)
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    top = req.top_logprobs or 0
    jobs = make_jobs(st, [ids], [budget(st, asked, len(ids), st.max_tokens_cap, "messages")], req, stops, logprobs=top if req.logprobs else None,
                     stream=bool(req.stream), images=images)
    out = ChatChoices(
        st.engine, {"id": rid, "object": "chat.completion.chunk" if req.stream else "chat.completion", "created": now, "model": st.model_name,
                    "system_fingerprint": None},
        ids, jobs, want=req.logprobs, top=top, include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )
    if req.stream:
        usage_chunk = out.usage_chunk if out.include_usage else None
        return event_stream(stream_events(jobs, out.chunk, usage_chunk, guards_for(st.rails, jobs, rid)))
    results = checked_outputs(st.rails, await run_all(request, jobs), rid)
    choices = [out.choice(i, text, reason, st.rails.refusal if blocked else None, lps) for i, (text, reason, blocked, lps) in enumerate(results)]
    return JSONResponse({**out.base, "choices": choices, "usage": usage([ids], jobs)})
