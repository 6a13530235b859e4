"""GET /health (is the model loaded?) and GET /metrics (Prometheus text)."""

from __future__ import annotations

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
    return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE)
