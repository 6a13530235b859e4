"""What every route of one server needs, kept on the app (`app.state.llmctl`), not in closures."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request

if TYPE_CHECKING:
    from llmctl.safety import Rails
    from llmctl.server.engine import Engine
    from llmctl.server.metrics import Metrics


@dataclass
class ServerState:
    engine: Engine
    model_name: str  # the one model this server answers for
    max_tokens_cap: int  # serve.max_tokens_cap
    metrics: Metrics
    rails: Rails
    created: int = field(default_factory=lambda: int(time.time()))  # /v1/models' "created"
    image_limits: Any = None  # the serve section: allow_remote_images, max_images, max_image_bytes, max_image_pixels


def server_state(request: Request) -> ServerState:
    return request.app.state.llmctl
