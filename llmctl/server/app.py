"""FastAPI app in the OpenAI API shape: /v1/models, /v1/completions, /v1/chat/completions,
/health and /metrics (Prometheus text)."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from llmctl.server.engine import Engine, Job, QueueFull

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.tokens = 0
        self.queue = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.lat_sum = 0.0
        self.lat_count = 0

    def request(self, path: str, status: int, seconds: float | None = None) -> None:
        with self.lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
            if seconds is not None:
                i = next((k for k, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
                self.buckets[i] += 1
                self.lat_sum += seconds
                self.lat_count += 1

    def add_tokens(self, n: int) -> None:
        with self.lock:
            self.tokens += n

    def set_queue(self, n: int) -> None:
        self.queue = n

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP llmctl_requests_total Requests by path and status.", "# TYPE llmctl_requests_total counter"]
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'llmctl_requests_total{{path="{path}",status="{status}"}} {n}')
            errors = sum(n for (_, s), n in self.requests.items() if s >= 400)
            lines += ["# HELP llmctl_errors_total Requests answered with a 4xx or 5xx.", "# TYPE llmctl_errors_total counter", f"llmctl_errors_total {errors}"]
            lines += ["# HELP llmctl_tokens_generated_total Completion tokens generated.", "# TYPE llmctl_tokens_generated_total counter", f"llmctl_tokens_generated_total {self.tokens}"]
            lines += ["# HELP llmctl_queue_depth Sequences waiting for a batch.", "# TYPE llmctl_queue_depth gauge", f"llmctl_queue_depth {self.queue}"]
            lines += ["# HELP llmctl_request_latency_seconds Completion latency.", "# TYPE llmctl_request_latency_seconds histogram"]
            acc = 0
            for b, n in zip(LATENCY_BUCKETS, self.buckets):
                acc += n
                lines.append(f'llmctl_request_latency_seconds_bucket{{le="{b}"}} {acc}')
            acc += self.buckets[-1]
            lines.append(f'llmctl_request_latency_seconds_bucket{{le="+Inf"}} {acc}')
            lines.append(f"llmctl_request_latency_seconds_sum {self.lat_sum:.6f}")
            lines.append(f"llmctl_request_latency_seconds_count {self.lat_count}")
        return "\n".join(lines) + "\n"


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False


class CompletionRequest(_Req):
    prompt: Union[str, list[str]]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Req):
    messages: list[Message] = Field(min_length=1)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None, headers: dict | None = None):
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def create_app(engine: Engine, model_name: str, max_tokens_cap: int, api_key: str | None, metrics: Metrics):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="llmctl", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        t0 = time.time()
        if api_key and request.url.path != "/health":
            got = request.headers.get("authorization", "")
            if not (got.startswith("Bearer ") and secrets.compare_digest(got[7:].strip(), api_key)):
                metrics.request(request.url.path, 401)
                return JSONResponse(error_body("missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error", code="invalid_api_key"), status_code=401)
        resp = await call_next(request)
        if request.url.path not in ("/metrics", "/health"):
            metrics.request(request.url.path, resp.status_code, time.time() - t0 if resp.status_code < 400 else None)
        return resp

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            msg, param = "request body is not valid JSON", None
        else:
            param = ".".join(loc) or None
            msg = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        return JSONResponse(error_body(msg, param=param), status_code=400)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status, headers=exc.headers)

    @app.get("/health")
    async def health():
        if engine.error:
            return JSONResponse({"status": "error", "error": engine.error}, status_code=500)
        if not engine.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def prom():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "llmctl"}]}

    def check(req: _Req) -> tuple[int, list[str]]:
        if req.model != model_name:
            raise ApiError(404, f"model '{req.model}' does not exist; this server serves '{model_name}'", param="model", code="model_not_found")
        if not engine.ready.is_set():
            raise ApiError(503, "model is still loading", "server_error", headers={"Retry-After": "2"})
        max_tokens = req.max_tokens or min(16 if isinstance(req, CompletionRequest) else max_tokens_cap, max_tokens_cap)
        if max_tokens > max_tokens_cap:
            raise ApiError(400, f"max_tokens {max_tokens} is above this server's cap of {max_tokens_cap}", param="max_tokens")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "at most 4 stop sequences", param="stop")
        return max_tokens, stops

    def encode(text: str, max_tokens: int, param: str) -> list[int]:
        ids = engine.tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ApiError(400, "the prompt is empty", param=param)
        ctx = engine.context_length
        if ctx and len(ids) + max_tokens > ctx:
            raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context length of {ctx}", param=param, code="context_length_exceeded")
        return ids

    def make_jobs(prompts: list[list[int]], req: _Req, max_tokens: int, stops: list[str]) -> list[Job]:
        loop = asyncio.get_running_loop()
        jobs = []
        for ids in prompts:
            for k in range(req.n):
                seed = None if req.seed is None else req.seed + k
                jobs.append(Job(ids, max_tokens, req.temperature, req.top_p, stops, seed, loop, asyncio.Queue()))
        try:
            engine.submit(jobs)
        except QueueFull:
            raise ApiError(429, "the server is busy: too many queued requests, retry shortly", "rate_limit_error", headers={"Retry-After": "1"}) from None
        return jobs

    async def collect(job: Job) -> tuple[str, str, int]:
        parts = []
        while True:
            item = await job.out.get()
            if item[0] == "delta":
                parts.append(item[1])
            elif item[0] == "done":
                return "".join(parts), item[1], item[2]
            else:
                raise ApiError(500, f"generation failed: {item[1]}", "server_error")

    async def run_all(jobs: list[Job]):
        try:
            return await asyncio.gather(*(collect(j) for j in jobs))
        finally:
            for j in jobs:
                j.cancelled = True  # a client gone mid-request frees its rows

    def usage(jobs: list[Job], results) -> dict:
        prompt = sum(len(p) for p in {id(j.prompt_ids): j.prompt_ids for j in jobs}.values())
        completion = sum(r[2] for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream_events(jobs: list[Job], make_chunk, rid: str):
        queues = {i: j for i, j in enumerate(jobs)}
        try:
            pending = {asyncio.ensure_future(j.out.get()): i for i, j in queues.items()}
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    item = fut.result()
                    if item[0] == "delta":
                        yield sse(make_chunk(i, item[1], None))
                        pending[asyncio.ensure_future(queues[i].out.get())] = i
                    elif item[0] == "done":
                        yield sse(make_chunk(i, "", item[1]))
                    else:
                        yield sse(error_body(f"generation failed: {item[1]}", "server_error"))
            yield "data: [DONE]\n\n"
        finally:
            for j in jobs:
                j.cancelled = True
            for fut in list(locals().get("pending", {})):
                fut.cancel()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        max_tokens, stops = check(req)
        texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not texts:
            raise ApiError(400, "prompt is empty", param="prompt")
        prompts = [encode(t, max_tokens, "prompt") for t in texts]
        jobs = make_jobs(prompts, req, max_tokens, stops)
        rid, now = "cmpl-" + secrets.token_hex(12), int(time.time())
        if req.stream:
            def chunk(i, text, finish):
                return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                        "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]}
            return StreamingResponse(stream_events(jobs, chunk, rid), media_type="text/event-stream")
        results = await run_all(jobs)
        choices = [{"index": i, "text": r[0], "logprobs": None, "finish_reason": r[1]} for i, r in enumerate(results)]
        return {"id": rid, "object": "text_completion", "created": now, "model": model_name, "choices": choices, "usage": usage(jobs, results)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        max_tokens, stops = check(req)
        if not getattr(engine.tok, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions", param="messages", code="no_chat_template")
        text = engine.tok.apply_chat_template([m.model_dump() for m in req.messages], tokenize=False, add_generation_prompt=True)
        jobs = make_jobs([encode(text, max_tokens, "messages")], req, max_tokens, stops)
        rid, now = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        if req.stream:
            started: set[int] = set()

            def chunk(i, text, finish):
                delta: dict[str, Any] = {}
                if i not in started:
                    started.add(i)
                    delta["role"] = "assistant"
                if text:
                    delta["content"] = text
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return StreamingResponse(stream_events(jobs, chunk, rid), media_type="text/event-stream")
        results = await run_all(jobs)
        choices = [{"index": i, "message": {"role": "assistant", "content": r[0]}, "logprobs": None, "finish_reason": r[1]} for i, r in enumerate(results)]
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name, "choices": choices, "usage": usage(jobs, results)}

    return app
