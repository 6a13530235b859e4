"""FastAPI app in the OpenAI API shape: /v1/models, /v1/completions, /v1/chat/completions,
/v1/moderations, /health and /metrics (Prometheus text).

Handlers validate and tokenize, then hand sequences to the engine thread (engine.py) and
read their tokens back from per-sequence asyncio queues, streamed as server-sent events or
collected into one response. A client that goes away cancels its sequences. The safety
rails (llmctl/safety.py) check prompts before they are tokenized and generated text before
it leaves: streamed text passes through an output guard that holds back what a rail might
still match.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmctl.safety import CONTENT_FILTER, Blocked, Rails
from llmctl.server.engine import Engine, Job, QueueFull
from llmctl.server.metrics import Metrics
from llmctl.server.schemas import UNSUPPORTED, ApiError, ChatRequest, CompletionRequest, ModerationRequest, _Req, error_body
from llmctl.tokenizer import with_bos

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MODERATION_MODEL = "llmctl-rails"


async def _send_error(send, status: int, body: dict, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), *(headers or [])]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


class AuthAndMetrics:
    """Pure ASGI middleware: the API key check, the request size limit and per-request
    counters/latency.

    Latency runs to the last byte of the response, so streamed requests count in full.
    """

    def __init__(self, app, api_key: str | None, metrics: Metrics, max_body: int | None = None):
        self.app, self.api_key, self.metrics, self.max_body = app, api_key, metrics, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        t0 = time.perf_counter()
        if self.api_key and path != "/health" and not self._authorized(scope):
            self.metrics.request(path, 401)
            body = error_body("missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error", code="invalid_api_key")
            await _send_error(send, 401, body, [(b"www-authenticate", b"Bearer")])
            return
        if self.max_body and scope.get("method") == "POST":
            receive = await self._limited_body(scope, receive)
            if receive is None:
                self.metrics.request(path, 413)
                msg = f"the request body is larger than this server's limit of {self.max_body} bytes (serve.max_request_bytes)"
                await _send_error(send, 413, error_body(msg, code="request_too_large"))
                return
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False) and path not in ("/metrics", "/health"):
                ok = status["code"] < 400 and path.startswith("/v1/") and path != "/v1/models"
                self.metrics.request(path, status["code"], time.perf_counter() - t0 if ok else None)

        await self.app(scope, receive, send_wrapper)

    async def _limited_body(self, scope, receive):
        """A receive that replays the body, or None if the body is over the limit."""
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.max_body:
                return None
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left: let the app see it
                first = msg
                break
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return None
            if not msg.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return first
            return await receive()

        return replay

    def _authorized(self, scope) -> bool:
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                got = v.decode("latin-1")
                return got.startswith("Bearer ") and secrets.compare_digest(got[7:].strip().encode(), self.api_key.encode())
        return False


def create_app(
    engine: Engine, model_name: str, max_tokens_cap: int, api_key: str | None, metrics: Metrics,
    rails: Rails | None = None, max_request_bytes: int | None = None,
):
    if rails is None:
        from llmctl.config import SafetyConfig

        rails = Rails(SafetyConfig(), stage="serve", on_event=metrics.safety)
    app = FastAPI(title="llmctl", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AuthAndMetrics, api_key=api_key, metrics=metrics, max_body=max_request_bytes)
    created = int(time.time())

    # ---- errors: always the OpenAI shape ------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") in ("json_invalid", "model_attributes_type") or not errs:
            what = "valid JSON" if first.get("type") == "json_invalid" else "a JSON object"
            return JSONResponse(error_body(f"the request body is not {what}"), status_code=400)
        # Union errors carry the member type in the location; keep the field names only.
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not str(p).startswith(("str", "list[", "int", "bool", "function-"))]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid value")
        return JSONResponse(error_body(f"{param}: {msg}" if param else msg, param=param), status_code=400)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"no such endpoint: {request.method} {request.url.path} (this server has /v1/models, /v1/completions, /v1/chat/completions, /v1/moderations, /health, /metrics)"
        else:
            msg = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(msg, code=str(exc.status_code)), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    # ---- plain endpoints ----------------------------------------------------------
    @app.get("/health")
    async def health():
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": f"{type(engine.error).__name__}: {engine.error}"}, status_code=500)
        if not engine.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def prom():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "llmctl"}]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str):
        if name != model_name:
            raise ApiError(404, f"model '{name}' does not exist; this server serves '{model_name}'", param="model", code="model_not_found")
        return {"id": model_name, "object": "model", "created": created, "owned_by": "llmctl"}

    # ---- validation shared by both generation endpoints ------------------------------
    def check(req: _Req) -> list[str]:
        if req.model != model_name:
            raise ApiError(404, f"model '{req.model}' does not exist; this server serves '{model_name}'", param="model", code="model_not_found")
        if engine.error is not None:
            raise ApiError(500, "the model failed to load; see /health", "server_error")
        if not engine.ready.is_set():
            raise ApiError(503, "the model is still loading: retry shortly", "server_error", code="model_loading", headers={"Retry-After": "2"})
        for name, off in UNSUPPORTED.items():
            value = getattr(req, name)
            if not any(value == o and type(value) is type(o) for o in off):
                raise ApiError(400, f"{name} is not supported by this server: leave it out", param=name, code="unsupported_parameter")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "stop: at most 4 stop sequences", param="stop")
        return [s for s in stops if s]

    def budget(asked: int | None, prompt_len: int, default: int, param: str) -> int:
        """max_tokens for one prompt: the asked value within the cap and the context."""
        if asked is not None and asked > max_tokens_cap:
            raise ApiError(400, f"max_tokens ({asked}) is above this server's cap of {max_tokens_cap} (serve.max_tokens_cap)", param="max_tokens")
        ctx = engine.context_length
        room = (ctx - prompt_len) if ctx else max_tokens_cap
        if room < 1 or (asked is not None and asked > room):
            want = asked if asked is not None else 1
            raise ApiError(
                400,
                f"this model's context length is {ctx} tokens; the prompt has {prompt_len} and max_tokens asks for {want}: shorten the prompt or lower max_tokens",
                param=param,
                code="context_length_exceeded",
            )
        return asked if asked is not None else min(default, room)

    def tokenize(prompt: Any, param: str) -> list[int]:
        """Text with BOS first when the tokenizer wants it (the rule generate and training use);
        token ids exactly as sent."""
        if isinstance(prompt, str):
            ids = with_bos(engine.tok, engine.tok(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
        else:
            ids = list(prompt)
            vocab = engine.model.get_input_embeddings().weight.shape[0]
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ApiError(400, f"{param}: token id {bad} is outside the vocabulary (0..{vocab - 1})", param=param)
        if not ids:
            raise ApiError(400, f"{param}: the prompt is empty", param=param)
        return ids

    def make_jobs(prompts: list[list[int]], budgets: list[int], req: _Req, stops: list[str], logprobs: int | None = None, echo: bool = False,
                  stream: bool = True) -> list[Job]:
        loop = asyncio.get_running_loop()
        total = len(prompts) * req.n
        if total > engine.max_queue:
            raise ApiError(400, f"this request asks for {total} completions (prompts x n); this server queues at most {engine.max_queue} (serve.max_queue)", param="n")
        jobs = []
        for ids, mt in zip(prompts, budgets):
            for k in range(req.n):
                jobs.append(Job(
                    ids, mt, temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k or 0, 0),
                    repetition_penalty=req.repetition_penalty, stop=stops,
                    # torch seeds are unsigned 64-bit: n > 1 adds k, negative seeds wrap.
                    seed=None if req.seed is None else (req.seed + k) % 2**64, loop=loop, out=asyncio.Queue(),
                    presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                    logprobs=logprobs, echo_logprobs=echo and logprobs is not None, stream=stream,
                ))
        try:
            engine.submit(jobs)
        except QueueFull:
            raise ApiError(429, "the server is busy: too many queued requests, retry shortly", "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        metrics.add_prompt_tokens(sum(len(p) for p in prompts) * req.n)
        return jobs

    def usage(prompts: list[list[int]], jobs: list[Job]) -> dict:
        prompt = sum(len(p) for p in prompts)
        completion = sum(len(j.tokens) for j in jobs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ---- reading the engine's output --------------------------------------------------
    async def collect(job: Job) -> tuple[str, str, list]:
        parts, lps = [], []
        while True:
            item = await job.out.get()
            if item[0] == "delta":
                parts.append(item[1])
                lps += item[2] if len(item) > 2 else []  # (engines without logprobs send two)
            elif item[0] == "done":
                return "".join(parts), item[1], lps
            else:
                raise ApiError(500, f"generation failed: {item[1]}", "server_error")

    # ---- logprobs in OpenAI's two shapes -------------------------------------------------
    def legacy_logprobs(entries: list, shift: int = 0) -> dict:
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

    def chat_logprobs(entries: list, top: int) -> dict:
        """/v1/chat/completions: content[] of {token, logprob, bytes, top_logprobs[]}."""
        dec = engine.token_text

        def one(t: int, lp: float) -> dict:
            return {"token": dec(t), "logprob": lp, "bytes": engine.token_bytes(t)}

        return {"content": [{**one(t, lp), "top_logprobs": [one(a, v) for a, v in alts[:top]]} for t, lp, alts, _ in entries], "refusal": None}

    async def run_all(request: Request, jobs: list[Job]) -> list[tuple[str, str, list]]:
        """All sequences' results; cancels them if the client disconnects first."""
        task = asyncio.gather(*(collect(j) for j in jobs))

        async def hung_up() -> None:
            # The body is read: the next ASGI message is the client's disconnect, sent by the
            # server the moment the connection closes (no polling delay).
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(hung_up())
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            task.cancel()
            raise ApiError(499, "client closed the request", code="client_closed")
        finally:
            watcher.cancel()
            for j in jobs:
                j.cancelled = True  # no-op for finished ones; frees the rows of an abandoned request
            if not task.done():
                task.cancel()

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream_events(jobs: list[Job], make_chunk, usage_chunk, guards=None):
        """Server-sent events as sequences produce text; `data: [DONE]` at the end.

        With output rails, each sequence's text passes through its guard first; a block
        ends that sequence with finish_reason content_filter and stops generating it.
        """
        pending: dict[asyncio.Future, int] = {}
        held: list[list] = [[] for _ in jobs]  # logprobs waiting for a guard that may change text
        try:
            pending = {asyncio.ensure_future(j.out.get()): i for i, j in enumerate(jobs)}
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    item = fut.result()
                    g = guards[i] if guards else None
                    if item[0] == "delta":
                        text = g.feed(item[1]) if g else item[1]
                        # Logprobs travel with their text, unless a guard may still change it:
                        # then they wait for the end and go only if nothing was changed.
                        lps = item[2] if len(item) > 2 else []
                        if g is not None and g.hold:
                            held[i] += lps
                            lps = []
                        if text or lps:
                            yield sse(make_chunk(i, text, None, lps))
                        if g is not None and g.blocked:
                            jobs[i].cancelled = True
                            yield sse(make_chunk(i, "", CONTENT_FILTER, []))
                        else:
                            pending[asyncio.ensure_future(jobs[i].out.get())] = i
                    elif item[0] == "done":
                        tail = g.finish() if g else ""
                        lps = held[i] if g is not None and not g.blocked and g.released == g.text else []
                        if tail or lps:
                            yield sse(make_chunk(i, tail, None, lps))
                        yield sse(make_chunk(i, "", CONTENT_FILTER if g is not None and g.blocked else item[1], []))
                    else:
                        yield sse(error_body(f"generation failed: {item[1]}", "server_error"))
            if usage_chunk is not None:
                yield sse(usage_chunk())
            yield "data: [DONE]\n\n"
        finally:  # also on client disconnect (the generator is closed or cancelled)
            for j in jobs:
                j.cancelled = True
            for fut in pending:
                fut.cancel()

    # ---- safety rails ---------------------------------------------------------------------
    def checked_input(text: str, rid: str, param: str) -> str:
        """The prompt text after the input rails; a block is a 400 naming the rail."""
        try:
            return rails.check_input(text, rid, param=param)
        except Blocked as b:
            raise ApiError(
                400, f"{param}: refused by the safety rail '{b.rail}' ({', '.join(b.kinds)})",
                param=param, code=CONTENT_FILTER, headers={"x-request-id": rid},
            ) from None

    def checked_outputs(results: list[tuple[str, str, list]], rid: str) -> list[tuple[str, str, bool, list | None]]:
        """(text, finish_reason, blocked, logprobs) per choice after the output rails. A choice
        whose text a rail changed keeps no logprobs: their tokens would show what was removed."""
        if not rails.active("output"):
            return [(t, r, False, lps) for t, r, lps in results]
        out = []
        for i, (raw, reason, lps) in enumerate(results):
            text, blocked = rails.check_output(raw, rid, choice=i)
            out.append((text, CONTENT_FILTER if blocked else reason, blocked, lps if text == raw else None))
        return out

    def guards_for(jobs: list[Job], rid: str):
        return [rails.guard(rid, choice=i) for i in range(len(jobs))] if rails.active("output") else None

    def streaming(gen) -> Any:
        return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- generation endpoints ----------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        stops = check(req)
        p = req.prompt
        if isinstance(p, list) and not p:
            raise ApiError(400, "prompt: the prompt is empty", param="prompt")
        if isinstance(p, str) or isinstance(p[0], int):
            items = [p]
        else:
            items = list(p)
        rid, now = "cmpl-" + secrets.token_hex(12), int(time.time())
        prompts = [tokenize(x, "prompt") for x in items]
        if rails.active("input"):
            for k, (x, ids) in enumerate(zip(items, prompts)):
                text = x if isinstance(x, str) else engine.tok.decode(ids)
                checked = checked_input(text, rid, "prompt")
                if checked != text:
                    prompts[k] = tokenize(checked, "prompt")
        budgets = [budget(req.max_tokens, len(ids), DEFAULT_COMPLETION_TOKENS, "prompt") for ids in prompts]
        jobs = make_jobs(prompts, budgets, req, stops, logprobs=req.logprobs, echo=req.echo, stream=bool(req.stream))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        base = {"id": rid, "object": "text_completion", "created": now, "model": model_name, "system_fingerprint": None}
        # echo: each choice starts with its prompt, exactly as sent (token-id prompts decoded).
        echoed = [(x if isinstance(x, str) else engine.tok.decode(ids[engine.leading_bos(ids):])) if req.echo else "" for x, ids in zip(items, prompts)]
        want = req.logprobs is not None

        def prompt_part(i: int) -> tuple[str, list]:
            j = jobs[i]
            return echoed[i // req.n], (j.prompt_lps or []) if want else []

        if req.stream:
            opened: set[int] = set()

            def chunk(i, text, finish, lps):
                shift = len(echoed[i // req.n])
                if i not in opened:
                    opened.add(i)
                    head, head_lps = prompt_part(i)
                    text, lps = head + text, head_lps + [(t, lp, a, off + shift) for t, lp, a, off in lps]
                    shift = 0
                c = {**base, "choices": [{"index": i, "text": text, "logprobs": legacy_logprobs(lps, shift) if want else None, "finish_reason": finish}]}
                return {**c, "usage": None} if include_usage else c

            def usage_chunk():
                return {**base, "choices": [], "usage": usage(prompts, jobs)}

            return streaming(stream_events(jobs, chunk, usage_chunk if include_usage else None, guards_for(jobs, rid)))
        results = checked_outputs(await run_all(request, jobs), rid)
        choices = []
        for i, (text, reason, _, lps) in enumerate(results):
            head, head_lps = prompt_part(i)
            logprobs = legacy_logprobs(head_lps + [(t, lp, a, off + len(head)) for t, lp, a, off in lps]) if want and lps is not None else None
            choices.append({"index": i, "text": head + text, "logprobs": logprobs, "finish_reason": reason})
        # plain JSON values already: a JSONResponse skips FastAPI's jsonable_encoder walk
        return JSONResponse({**base, "choices": choices, "usage": usage(prompts, jobs)})

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        stops = check(req)
        if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ: send one of them", param="max_completion_tokens")
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if not getattr(engine.tok, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions, or set tokenizer.chat_template and re-run prepare and train", param="messages", code="no_chat_template")
        rid, now = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        msgs = [{"role": m.role, "content": checked_input(m.text(), rid, f"messages[{i}].content")} for i, m in enumerate(req.messages)]
        try:
            text = engine.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises on conversations the template refuses
            raise ApiError(400, f"messages: the chat template rejected this conversation: {e}", param="messages") from None
        ids = tokenize(text, "messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        top = req.top_logprobs or 0
        want = req.logprobs
        jobs = make_jobs([ids], [budget(asked, len(ids), max_tokens_cap, "messages")], req, stops, logprobs=top if want else None,
                         stream=bool(req.stream))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        base = {"id": rid, "object": "chat.completion.chunk" if req.stream else "chat.completion", "created": now, "model": model_name, "system_fingerprint": None}
        if req.stream:
            started: set[int] = set()

            def chunk(i, text, finish, lps):
                delta: dict[str, Any] = {}
                if i not in started:
                    started.add(i)
                    delta["role"] = "assistant"
                if text:
                    delta["content"] = text
                c = {**base, "choices": [{"index": i, "delta": delta, "logprobs": chat_logprobs(lps, top) if want and lps else None, "finish_reason": finish}]}
                return {**c, "usage": None} if include_usage else c

            def usage_chunk():
                return {**base, "choices": [], "usage": usage([ids], jobs)}

            return streaming(stream_events(jobs, chunk, usage_chunk if include_usage else None, guards_for(jobs, rid)))
        results = checked_outputs(await run_all(request, jobs), rid)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": text, "refusal": rails.refusal if blocked else None},
             "logprobs": chat_logprobs(lps, top) if want and lps is not None else None, "finish_reason": reason}
            for i, (text, reason, blocked, lps) in enumerate(results)
        ]
        return JSONResponse({**base, "choices": choices, "usage": usage([ids], jobs)})

    # ---- moderation ----------------------------------------------------------------------
    @app.post("/v1/moderations")
    async def moderations(req: ModerationRequest):
        texts = req.texts()
        # Every detector, whatever the rails do to traffic; off the event loop (the
        # classifier's first call loads its model).
        results = await asyncio.to_thread(lambda: [rails.moderate(t) for t in texts])
        return {"id": "modr-" + secrets.token_hex(12), "model": MODERATION_MODEL, "results": results}

    return app
