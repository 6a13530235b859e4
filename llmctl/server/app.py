"""FastAPI app in the OpenAI API shape: /v1/models, /v1/completions, /v1/chat/completions,
/v1/moderations, /health and /metrics (Prometheus text).

Where things are:
  routes/        one APIRouter per endpoint family (completions, chat, models, health and
                 metrics, moderations, the playground page at GET /)
  jobs.py        request -> engine jobs: shared checks, tokenizing, max_tokens budget, make_jobs
  results.py     engine jobs -> client: collected (cancelled when the client hangs up) or
                 streamed as server-sent events
  rails.py       the safety rails (llmctl/safety.py) on prompts, collected and streamed text
  state.py       what the routes share, on `app.state.llmctl`
  errors.py      every error in OpenAI's shape; middleware.py: API key, body limit, metrics

Handlers validate and tokenize, then hand sequences to the engine thread (engine.py) and
read their tokens back from per-sequence asyncio queues.
"""

from __future__ import annotations

from fastapi import FastAPI

from llmctl.safety import Rails
from llmctl.server.engine import Engine
from llmctl.server.errors import add_error_handlers
from llmctl.server.metrics import Metrics
from llmctl.server.middleware import AuthAndMetrics
from llmctl.server.routes import chat, completions, health, models, moderations, playground
from llmctl.server.state import ServerState


def create_app(
    engine: Engine, model_name: str, max_tokens_cap: int, api_key: str | None, metrics: Metrics,
    rails: Rails | None = None, max_request_bytes: int | None = None, playground_page: bool = True, image_limits=None,
) -> FastAPI:
    if rails is None:
        from llmctl.config import SafetyConfig

        rails = Rails(SafetyConfig(), stage="serve", on_event=metrics.safety)
    app = FastAPI(title="llmctl", docs_url=None, redoc_url=None, openapi_url=None)
    if image_limits is None:
        from llmctl.config import ServeConfig

        image_limits = ServeConfig()
    app.state.llmctl = ServerState(engine, model_name, max_tokens_cap, metrics, rails, image_limits=image_limits)
    app.add_middleware(AuthAndMetrics, api_key=api_key, metrics=metrics, max_body=max_request_bytes)
    add_error_handlers(app)
    for routes in (health, models, completions, chat, moderations) + ((playground,) if playground_page else ()):
        app.include_router(routes.router)
    return app
