"""GET /v1/models and /v1/models/{name}: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter, Request

from llmctl.server.schemas import ApiError
from llmctl.server.state import ServerState, server_state

router = APIRouter()


def model_card(st: ServerState) -> dict:
    return {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "llmctl"}


@router.get("/v1/models")
async def models(request: Request):
    return {"object": "list", "data": [model_card(server_state(request))]}


@router.get("/v1/models/{name:path}")
async def model_info(name: str, request: Request):
    st = server_state(request)
    if name != st.model_name:
        raise ApiError(404, f"model '{name}' does not exist; this server serves '{st.model_name}'", param="model", code="model_not_found")
    return model_card(st)
