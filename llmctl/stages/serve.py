"""`llmctl serve`: the run's model over an OpenAI-compatible HTTP API.

Serves export/hf when a complete export exists, else train/model, or --model. Binds
127.0.0.1 unless told otherwise. SIGTERM (or Ctrl-C) stops accepting, lets in-flight
requests finish, and exits 0.
"""

from __future__ import annotations

import os
import signal

from llmctl import console as _console
from llmctl.errors import ConfigError, LlmctlError
from llmctl.rundir import RunDir


def run(cfg, rd: RunDir, *, model: str | None = None, host: str | None = None, port: int | None = None, **_) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise ConfigError("llmctl serve needs FastAPI and uvicorn: pip install 'llmctl[serve]'") from None
    from llmctl.modeling import resolve_model_path
    from llmctl.server.app import Metrics, create_app
    from llmctl.server.engine import Engine

    con = _console.current()
    s = cfg.serve
    path = resolve_model_path(model or s.model, rd, cfg, "serve", prefer_export=True)
    name = s.model_name or cfg.run.name
    api_key = s.api_key or os.environ.get("LLMCTL_API_KEY") or None
    host = host or s.host
    port = s.port if port is None else port
    metrics = Metrics()
    engine = Engine(path, s.max_batch_size, s.max_queue, s.batch_wait_ms, metrics, trust_remote_code=cfg.model.trust_remote_code)
    con.step(f"loading {path}")
    engine.load()  # /health is ready from the first request on
    engine.start()
    app = create_app(engine, name, s.max_tokens_cap, api_key, metrics)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    stopping = {"sig": None}

    def on_signal(signum, frame):
        # uvicorn has already begun its graceful shutdown; it calls this again afterwards.
        stopping["sig"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    import threading

    def announce():
        while not server.started and not server.should_exit:
            threading.Event().wait(0.05)
        if server.started:
            sock = server.servers[0].sockets[0].getsockname()
            auth = " (API key required)" if api_key else ""
            con.info(f"llmctl serve: {name} ({path}) on http://{sock[0]}:{sock[1]}/v1{auth}")

    threading.Thread(target=announce, daemon=True).start()
    try:
        server.run()
    finally:
        engine.stop()
    if not server.started:
        raise LlmctlError(f"could not start the server on {host}:{port} (is the port in use?)")
    con.info("llmctl serve: stopped")
    return None
