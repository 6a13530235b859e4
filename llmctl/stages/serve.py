"""`llmctl serve`: the run's model over an OpenAI-compatible HTTP API.

Serves export/hf when a complete export exists, else train/model, or --model. Binds
127.0.0.1 unless told otherwise; a non-loopback address needs an API key (or --insecure).
The port opens at once and the model loads in the engine thread: /health answers 503
until it is ready, then the URL is printed. SIGTERM (or Ctrl-C) stops accepting, lets
in-flight requests finish, and exits 0. The safety rails check traffic and log each
intervention to RUN/serve/audit.jsonl.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import threading

from llmctl import console as _console
from llmctl.errors import ConfigError, LlmctlError
from llmctl.rundir import RunDir

API_KEY_ENV = "LLMCTL_API_KEY"


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves: a busy port is one clear line, not a uvicorn log."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"serve.host / --host: cannot resolve '{host}': {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    # The protocol number matters: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # sockets whose proto is IPPROTO_TCP, and a socket made with proto 0 held every keep-alive
    # response's body until the client's delayed ACK, 40 ms later.
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise LlmctlError(f"cannot listen on {host}:{port}: {e.strerror}: pick another port with --port (0 = any free port)") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(sock: socket.socket) -> bool:
    """Whether the socket listens on a loopback address only (0.0.0.0 and :: are not)."""
    return ipaddress.ip_address(str(sock.getsockname()[0]).split("%")[0]).is_loopback


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(cfg, rd: RunDir, *, model: str | None = None, host: str | None = None, port: int | None = None, insecure: bool = False, **_) -> None:
    _require_serve_extra()
    from llmctl.modeling import resolve_model_path
    from llmctl.safety import AuditLog, Rails
    from llmctl.server.metrics import Metrics

    con = _console.current()
    s = cfg.serve
    path = resolve_model_path(model or s.model, rd, cfg, "serve", prefer_export=True)
    api_key = s.api_key or os.environ.get(API_KEY_ENV) or None
    port = s.port if port is None else port
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: a port is 0..65535 (0 = any free port)")
    metrics = Metrics()
    rails = Rails(cfg.safety, stage="serve", audit=AuditLog(rd.audit_path("serve")), on_event=metrics.safety)

    gguf = None
    if s.engine == "llama.cpp":  # no llama-server or no GGUF: fail before the port opens
        from llmctl.inference.llamacpp import require_server_binary

        require_server_binary()
        gguf = gguf_to_serve(cfg, rd, model or s.model)
    else:
        from llmctl.quantize import check as check_quantize

        check_quantize(s.quantize, key="serve.quantize")  # a missing library fails before the port opens
    sock = _open_socket(host or s.host, port, api_key, insecure, con)
    engine, server = _engine_and_server(cfg, path, api_key, metrics, rails, gguf)
    shown = (f"{gguf} on llama-server", "none") if gguf else (path, s.quantize)
    stopped_by = _serve(engine, server, sock, shown[0], s.model_name or cfg.run.name, api_key, shown[1], con, s.playground)
    if engine.error is not None:
        err = engine.error
        if isinstance(err, LlmctlError):
            raise err
        first = (str(err).strip().splitlines() or [""])[0]
        raise LlmctlError(f"cannot load the model from {path}: {type(err).__name__}: {first}")
    why = f" ({signal.Signals(stopped_by[0]).name})" if stopped_by else ""
    con.info(f"llmctl serve: stopped{why}")
    return None


def gguf_to_serve(cfg, rd: RunDir, explicit: str | None) -> str:
    """The GGUF file `serve.engine: llama.cpp` runs (llmctl.inference.llamacpp.gguf_to_run)."""
    from llmctl.inference.llamacpp import gguf_to_run

    return gguf_to_run(cfg, rd, explicit, cfg.serve.quantize, "serve")


def _require_serve_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("llmctl serve needs FastAPI, uvicorn and prometheus_client: pip install 'llmctl[serve]'") from None


def _open_socket(host: str, port: int, api_key: str | None, insecure: bool, con) -> socket.socket:
    """The listening socket; a non-loopback address without an API key needs --insecure."""
    sock = _bind(host, port)
    if not api_key and not _is_loopback(sock):
        if not insecure:
            sock.close()
            raise ConfigError(
                f"serve.host / --host: {host} is reachable from other machines and no API key is set: "
                f"set serve.api_key or ${API_KEY_ENV}, or pass --insecure to serve it to anyone"
            )
        con.warn(f"WARNING: serving {host} WITHOUT an API key (--insecure): anyone who can reach this address can use the model")
    return sock


def _engine_and_server(cfg, path: str, api_key: str | None, metrics, rails, gguf: str | None = None):
    import uvicorn

    from llmctl.server.app import create_app
    from llmctl.server.engine import Engine

    s = cfg.serve
    if gguf is not None:
        from llmctl.server.llamacpp_engine import LlamaCppEngine

        engine = LlamaCppEngine(path, gguf, s.max_batch_size, s.max_queue, metrics, trust_remote_code=cfg.model.trust_remote_code,
                                threads=s.threads, quantize=s.quantize, warm=rails.warm)
    else:
        engine = Engine(
            path, s.max_batch_size, s.max_queue, s.batch_wait_ms, metrics,
            trust_remote_code=cfg.model.trust_remote_code, device=s.device, threads=s.threads, quantize=s.quantize,
            warm=rails.warm,
        )
    app = create_app(engine, s.model_name or cfg.run.name, s.max_tokens_cap, api_key, metrics, rails=rails, max_request_bytes=s.max_request_bytes,
                     playground_page=s.playground, image_limits=s)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_graceful_shutdown=s.shutdown_timeout, lifespan="off",
    ))
    return engine, server


def _announce(engine, server, url: str, name: str, api_key: str | None, con, playground: bool = False) -> None:
    """Print the URL once the port is open and the model is ready; stop on a failed load."""
    while not engine.ready.wait(0.05):
        if engine.error is not None or server.should_exit:
            server.should_exit = True
            return
    while not server.started and not server.should_exit:
        threading.Event().wait(0.02)
    if server.started:
        auth = " (API key required: Authorization: Bearer ...)" if api_key else ""
        con.info(f"llmctl serve: {name} on {url}/v1{auth}  (health: {url}/health, metrics: {url}/metrics)")
        if playground:
            con.info(f"  playground: {url}/  (a chat page in the browser; through SSH: ssh -L PORT:127.0.0.1:PORT HOST)")
        con.info("  stop with Ctrl-C or SIGTERM: in-flight requests finish first")


def _serve(engine, server, sock: socket.socket, path: str, name: str, api_key: str | None, quantize: str, con,
           playground: bool = False) -> list[int]:
    """Load the model in the engine thread and serve until stopped; the signals that stopped it."""
    url = _url(sock)
    # The CLI turns SIGTERM into an exception; while serving, uvicorn handles SIGTERM/SIGINT
    # (stop accepting, finish in-flight requests) and re-raises the signal afterwards. These
    # handlers receive that re-raise, so the process exits 0 after a graceful stop.
    stopped_by: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stopped_by.append(signum)) for sig in (signal.SIGTERM, signal.SIGINT)}
    quant = f", quantized to {quantize} at load" if quantize != "none" else ""
    con.step(f"loading {path}{quant} (listening on {url}; /health answers 503 until the model is ready)")
    engine.start()
    threading.Thread(target=_announce, args=(engine, server, url, name, api_key, con, playground), name="llmctl-announce", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
        for sig, h in previous.items():
            signal.signal(sig, h)
    return stopped_by
