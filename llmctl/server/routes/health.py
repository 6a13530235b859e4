"""GET /health (is the model loaded?) and GET /metrics (Prometheus text)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from llmctl.server.metrics import CONTENT_TYPE
from llmctl.server.state import server_state

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    st = server_state(request)
    engine = st.engine
    if engine.error is not None:
        return JSONResponse({"status": "error", "error": f"{type(engine.error).__name__}: {engine.error}"}, status_code=500)
    if not engine.ready.is_set():
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})
    return {"status": "ok", "model": st.model_name}


@router.get("/metrics")
async def metrics(request: Request):
    """llmctl's metrics, then the engine's own (serve.engine llama.cpp: llama-server's)."""
    st = server_state(request)
    extra = await asyncio.to_thread(st.engine.engine_metrics)
    body = st.metrics.render()
    return Response(body + extra.encode() if extra else body, media_type=CONTENT_TYPE)
