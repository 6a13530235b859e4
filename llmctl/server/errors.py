"""Every error the app answers, in OpenAI's shape: {"error": {message, type, param, code}}."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmctl.server.schemas import ApiError, error_body

ENDPOINTS = "/v1/models, /v1/completions, /v1/chat/completions, /v1/moderations, /health, /metrics"


async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body that is not JSON, not an object, or breaks the schema: a 400 naming the field."""
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


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status, headers=exc.headers)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        msg = f"no such endpoint: {request.method} {request.url.path} (this server has {ENDPOINTS})"
    else:
        msg = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(error_body(msg, code=str(exc.status_code)), status_code=exc.status_code, headers=getattr(exc, "headers", None))


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
