"""POST /v1/moderations: every safety detector on the given texts, in OpenAI's shape."""

from __future__ import annotations

import asyncio
import secrets

from fastapi import APIRouter, Request

from llmctl.server.schemas import ModerationRequest
from llmctl.server.state import server_state

MODERATION_MODEL = "llmctl-rails"

router = APIRouter()


@router.post("/v1/moderations")
async def moderations(req: ModerationRequest, request: Request):
    rails = server_state(request).rails
    texts = req.texts()
    # Every detector, whatever the rails do to traffic; off the event loop (the
    # classifier's first call loads its model).
    results = await asyncio.to_thread(lambda: [rails.moderate(t) for t in texts])
    return {"id": "modr-" + secrets.token_hex(12), "model": MODERATION_MODEL, "results": results}
