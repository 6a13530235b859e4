"""The ASGI middleware in front of every route: API key, request size limit, request metrics."""

from __future__ import annotations

import json
import secrets
import time

from llmctl.server.metrics import Metrics
from llmctl.server.schemas import error_body


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
        # /health and the playground page (GET /: static, no secret; it asks for the key) are open.
        public = path == "/health" or (path == "/" and scope.get("method") in ("GET", "HEAD"))
        if self.api_key and not public and not self._authorized(scope):
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
