"""From engine jobs back to the client: each job's per-sequence asyncio queue is read whole
(`run_all`, cancelled when the client hangs up) or streamed as server-sent events
(`stream_events`)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from llmctl.safety import CONTENT_FILTER
from llmctl.server.engine import Job
from llmctl.server.schemas import ApiError, error_body

# (choice index, text, finish_reason or None, logprob entries) -> one chunk object
MakeChunk = Callable[[int, str, "str | None", list], dict]


async def collect(job: Job) -> tuple[str, str, list]:
    """(text, finish_reason, logprob entries) of one sequence, once it ends."""
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


async def stream_events(jobs: list[Job], make_chunk: MakeChunk, usage_chunk: Callable[[], dict] | None, guards=None) -> AsyncIterator[str]:
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


def event_stream(gen: AsyncIterator[str]) -> Any:
    return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
