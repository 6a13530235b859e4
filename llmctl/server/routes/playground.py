"""GET /: the chat playground, one self-contained page (llmctl/server/playground.html).

The page itself holds no secret, so it is served without the API key; it asks for the key
when the API answers 401 and keeps it in the page's memory. Off with `serve.playground: false`.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()
PATH = "/"


@lru_cache(maxsize=1)
def page() -> str:
    return resources.files("llmctl.server").joinpath("playground.html").read_text(encoding="utf-8")


@router.get(PATH, include_in_schema=False)
async def playground() -> HTMLResponse:
    # Nothing may be fetched from elsewhere: scripts and styles are the page's own, requests go
    # to this server only (connect-src 'self'), and the page cannot be framed by another site.
    csp = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'"
    return HTMLResponse(page(), headers={"Content-Security-Policy": csp, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
